//! The call writer: one task that applies call updates to the database in
//! the order they happened and queues the matching webhooks, so call tasks
//! hand updates off without waiting. A failed write is retried with backoff;
//! on shutdown the queue is drained before the task ends.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::calls::{self, CallUpdate};
use crate::db::Db;
use crate::domain::{OrgId, CallId};
use crate::webhooks::Webhooks;

enum Message {
    Update(CallId, OrgId, CallUpdate),
    /// A call that another path already settled: only its webhook is due.
    EndedElsewhere(CallId, OrgId),
}

#[derive(Clone)]
pub struct CallWriter {
    tx: mpsc::UnboundedSender<Message>,
    closed: tokio_util::sync::CancellationToken,
}

pub fn start(db: Db, webhooks: Webhooks) -> (CallWriter, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let closed = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(run(db, webhooks, rx, closed.clone()));
    (CallWriter { tx, closed }, task)
}

impl CallWriter {
    pub fn send(&self, id: CallId, account: OrgId, update: CallUpdate) {
        if self.tx.send(Message::Update(id, account, update)).is_err() {
            tracing::error!(call_id = %id, "call writer is gone; update lost");
        }
    }

    pub fn ended_elsewhere(&self, id: CallId, account: OrgId) {
        let _ = self.tx.send(Message::EndedElsewhere(id, account));
    }

    /// Lets the writer finish what is queued and stop.
    pub fn close(&self) {
        self.closed.cancel();
    }
}

async fn run(db: Db, webhooks: Webhooks, mut rx: mpsc::UnboundedReceiver<Message>, closed: tokio_util::sync::CancellationToken) {
    loop {
        let message = tokio::select! {
            biased;
            m = rx.recv() => m,
            _ = closed.cancelled() => rx.try_recv().ok(),
        };
        let Some(message) = message else { break };
        match message {
            Message::Update(id, account, update) => {
                if apply_with_retry(&db, id, &update).await {
                    let event = match update {
                        CallUpdate::Dialing { .. } => None,
                        CallUpdate::Ringing { .. } => Some("call.ringing"),
                        CallUpdate::Answered { .. } => Some("call.answered"),
                        CallUpdate::Ended(_) => Some("call.ended"),
                    };
                    if let Some(event) = event {
                        notify(&db, &webhooks, id, account, event).await;
                    }
                }
            }
            Message::EndedElsewhere(id, account) => notify(&db, &webhooks, id, account, "call.ended").await,
        }
    }
}

async fn apply_with_retry(db: &Db, id: CallId, update: &CallUpdate) -> bool {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=6 {
        match calls::apply(db, id, update).await {
            Ok(changed) => return changed,
            Err(e) => {
                tracing::warn!(call_id = %id, attempt, error = %e, "call update not saved yet");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    tracing::error!(call_id = %id, ?update, "call update lost after retries");
    false
}

/// Queues `event` with the call as it now stands.
async fn notify(db: &Db, webhooks: &Webhooks, id: CallId, account: OrgId, event: &str) {
    let result = async {
        let record = calls::get(db, account, id).await?;
        let data = serde_json::to_value(&record).map_err(|e| crate::Error::Internal(e.into()))?;
        webhooks.enqueue(account, event, data).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(call_id = %id, event, error = %e, "webhook not queued");
    }
}
