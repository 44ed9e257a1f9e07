//! The inference pool: heavy work (ASR, LLM, TTS) runs on blocking threads,
//! never on the async runtime's workers, and at most `permits` jobs run at
//! once so that a burst of calls queues instead of thrashing the cores.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::error::AgentError;

#[derive(Clone)]
pub struct InferencePool {
    permits: Arc<Semaphore>,
    size: usize,
}

impl InferencePool {
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        InferencePool { permits: Arc::new(Semaphore::new(size)), size }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Jobs that could start now without waiting.
    pub fn idle_slots(&self) -> usize {
        self.permits.available_permits()
    }

    /// Runs `job` once a permit is free.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, AgentError> {
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| AgentError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|e| AgentError::Inference(format!("inference job failed: {e}")))
    }

    /// Runs `job` only if a permit is free now: for optional work (partial
    /// transcripts) that must not delay the work a caller is waiting for.
    pub fn try_run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<tokio::task::JoinHandle<T>> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        }))
    }
}
