//! Records `last_used_at` for keys off the request path.
//!
//! Authentication must not wait on a write (SQLite has one writer), so the
//! guard hands key ids to this recorder, which writes at most once a minute
//! per key from its own task. If the queue is full the mark is dropped: the
//! timestamp is informational.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::db::Db;
use crate::domain::KeyId;

/// How stale `last_used_at` may get before it is written again.
pub const RESOLUTION_MS: i64 = 60_000;

#[derive(Clone, Debug)]
pub struct KeyUsageRecorder {
    tx: mpsc::Sender<(KeyId, i64)>,
}

impl KeyUsageRecorder {
    /// Starts the writer task; it stops when `shutdown` is cancelled.
    pub fn start(db: Db, shutdown: CancellationToken) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<(KeyId, i64)>(1024);
        let task = tokio::spawn(async move {
            loop {
                let (key, at) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    item = rx.recv() => match item { Some(item) => item, None => break },
                };
                let result = sqlx::query(
                    "UPDATE api_keys SET last_used_at = $1 WHERE id = $2 \
                     AND (last_used_at IS NULL OR last_used_at < $3)",
                )
                .bind(at)
                .bind(key.to_string())
                .bind(at - RESOLUTION_MS)
                .execute(&db.pool)
                .await;
                if let Err(e) = result {
                    tracing::warn!(error = %e, "could not record key usage");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        (KeyUsageRecorder { tx }, task)
    }

    /// Notes that `key` was used now, if the stored time is stale.
    pub fn mark(&self, key: KeyId, last_used_at: Option<i64>) {
        let now = now_ms();
        if last_used_at.is_none_or(|t| now - t >= RESOLUTION_MS) {
            let _ = self.tx.try_send((key, now));
        }
    }
}
