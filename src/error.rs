//! The crate's one error type, and its one mapping to the contract's error
//! shape `{"error": "...", "code": "..."}` with the matching HTTP status.
//!
//! Internal details (database messages, stack context) are logged, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid input; the message names the field and the bound.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("insufficient credits: {needed} needed, {balance} available")]
    PaymentRequired { needed: u64, balance: u64 },
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request conflicts with the object's state.
    #[error("{0}")]
    Conflict(String),
    #[error("Too many requests")]
    RateLimited { retry_after_secs: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl Error {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Error::BadRequest(msg.into())
    }

    pub fn not_found(what: &str) -> Self {
        Error::NotFound(format!("{what} not found"))
    }

    /// The contract's machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "BAD_REQUEST",
            Error::Unauthorized(_) => "UNAUTHORIZED",
            Error::PaymentRequired { .. } => "PAYMENT_REQUIRED",
            Error::Forbidden(_) => "FORBIDDEN",
            Error::NotFound(_) => "NOT_FOUND",
            Error::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Error::Conflict(_) => "CONFLICT",
            Error::RateLimited { .. } => "RATE_LIMITED",
            Error::Unavailable(_) => "SERVICE_UNAVAILABLE",
            Error::Database(e) if is_overloaded(e) => "SERVICE_UNAVAILABLE",
            Error::Database(_) | Error::Internal(_) => "INTERNAL_ERROR",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::PaymentRequired { .. } => StatusCode::PAYMENT_REQUIRED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Database(e) if is_overloaded(e) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Database(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message a client sees: internal failures get a generic text.
    fn public_message(&self) -> String {
        match self {
            Error::Database(e) if is_overloaded(e) => {
                "Service temporarily unavailable, retry with backoff".into()
            }
            Error::Database(_) | Error::Internal(_) => "Internal server error".into(),
            other => other.to_string(),
        }
    }
}

/// The database is overloaded, not broken: no connection was free in time,
/// SQLite's write lock stayed busy past the busy timeout, or PostgreSQL
/// gave up on a lock, a connection slot, a statement timeout, a deadlock or
/// a serialization conflict. The client should retry: 503, not 500.
fn is_overloaded(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(d) => {
            if d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLITE_BUSY (5) and SQLITE_LOCKED (6) with their extended codes.
                matches!(d.code().and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff), Some(5 | 6))
            } else if d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
                matches!(d.code().as_deref(), Some("55P03" | "53300" | "57014" | "40001" | "40P01"))
            } else {
                false
            }
        }
        _ => false,
    }
}

/// The contract's error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Human-readable message.
    pub error: String,
    /// `BAD_REQUEST`, `UNAUTHORIZED`, `PAYMENT_REQUIRED`, `FORBIDDEN`,
    /// `NOT_FOUND`, `CONFLICT`, `RATE_LIMITED`, `INTERNAL_ERROR` or `SERVICE_UNAVAILABLE`.
    pub code: String,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        // A 503 tells the client to retry (models loading, a node at its
        // call limit, an overloaded database): expected under load, and a
        // readiness probe meets it every few seconds while models load.
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(error = %self, code = self.code(), "request refused for now");
        } else if status.is_server_error() {
            tracing::error!(error = %self, code = self.code(), "request failed");
        }
        let body = ErrorBody { error: self.public_message(), code: self.code().into() };
        let mut response = (status, Json(body)).into_response();
        if let Error::RateLimited { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_database_busy_past_its_timeout_is_503_not_500() {
        use sqlx::{Connection, Executor};
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/busy.db?mode=rwc", dir.path().display());
        let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
        holder.execute("CREATE TABLE t (x INTEGER); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);").await.unwrap();
        let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
        other.execute("PRAGMA busy_timeout = 0").await.unwrap();
        let err = Error::from(other.execute("INSERT INTO t VALUES (2)").await.unwrap_err());
        assert_eq!((err.status(), err.code()), (StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE"), "{err}");
        // A real failure (a broken statement) stays a 500.
        let broken = Error::from(other.execute("INSERT INTO nowhere VALUES (1)").await.unwrap_err());
        assert_eq!(broken.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn internal_details_are_not_exposed() {
        let e = Error::Internal(anyhow::anyhow!("secret path /var/lib/x"));
        assert_eq!(e.public_message(), "Internal server error");
        assert_eq!(e.code(), "INTERNAL_ERROR");
    }

    #[tokio::test]
    async fn every_code_renders_the_contract_shape() {
        let cases = [
            (Error::bad_request("width: must be 256-2048"), 400, "BAD_REQUEST"),
            (Error::Unauthorized("Invalid API key"), 401, "UNAUTHORIZED"),
            (Error::PaymentRequired { needed: 10, balance: 3 }, 402, "PAYMENT_REQUIRED"),
            (Error::Forbidden("no".into()), 403, "FORBIDDEN"),
            (Error::not_found("call"), 404, "NOT_FOUND"),
            (Error::MethodNotAllowed, 405, "METHOD_NOT_ALLOWED"),
            (Error::RateLimited { retry_after_secs: 7 }, 429, "RATE_LIMITED"),
            (Error::Internal(anyhow::anyhow!("boom")), 500, "INTERNAL_ERROR"),
            (Error::Unavailable("db down".into()), 503, "SERVICE_UNAVAILABLE"),
        ];
        for (error, status, code) in cases {
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
            let bytes = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body["code"], code);
            assert!(body["error"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(body.as_object().unwrap().len(), 2);
            assert_eq!(retry_after.is_some(), status == 429);
        }
    }

    /// The log lines (level and message) `f` writes.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = lines.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_503_is_logged_as_a_warning_and_a_500_as_an_error() {
        let loading = logged(|| drop(Error::Unavailable("the speech models are loading".into()).into_response()));
        assert!(loading.contains("WARN") && loading.contains("the speech models are loading"), "{loading}");
        assert!(!loading.contains("ERROR"), "{loading}");
        let broken = logged(|| drop(Error::Internal(anyhow::anyhow!("boom")).into_response()));
        assert!(broken.contains("ERROR") && broken.contains("boom"), "{broken}");
        assert!(logged(|| drop(Error::not_found("call").into_response())).is_empty());
    }

    #[test]
    fn payment_required_names_the_amounts() {
        let e = Error::PaymentRequired { needed: 10, balance: 3 };
        assert_eq!(e.to_string(), "insufficient credits: 10 needed, 3 available");
    }

    #[test]
    fn pool_timeout_is_service_unavailable() {
        let e = Error::Database(sqlx::Error::PoolTimedOut);
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code(), "SERVICE_UNAVAILABLE");
    }
}
