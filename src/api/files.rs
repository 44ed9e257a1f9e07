//! `/files/{key}`: job outputs behind signed URLs (no API key: the
//! signature is the authorisation, as with any CDN link). An expired or
//! altered link is a 403; a valid link to a file that is gone is a 404.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::clock::now_ms;
use crate::jobs::storage::media_type_of;
use crate::state::AppState;
use crate::{Error, Result};

#[derive(Debug, Deserialize)]
pub struct Signed {
    expires: Option<i64>,
    sig: Option<String>,
}

pub async fn download(
    State(state): State<AppState>,
    Path(key): Path<String>,
    query: std::result::Result<Query<Signed>, axum::extract::rejection::QueryRejection>,
) -> Result<Response> {
    let forbidden = || Error::Forbidden("a signed link (expires and sig) is required".into());
    let Query(q) = query.map_err(|_| forbidden())?;
    let (Some(expires), Some(sig)) = (q.expires, q.sig) else { return Err(forbidden()) };
    let storage = &state.jobs.storage;
    storage.verify(&key, expires, &sig, now_ms() / 1000)?;
    let path = storage.path(&key)?;
    let file = tokio::fs::File::open(&path).await.map_err(|_| Error::not_found("file"))?;
    let len = file.metadata().await.map_err(|e| Error::Internal(e.into()))?.len();
    let content_type = media_type_of(path.extension().and_then(|e| e.to_str()).unwrap_or_default());
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CACHE_CONTROL, "private, max-age=3600".to_string()),
        ],
        body,
    )
        .into_response())
}
