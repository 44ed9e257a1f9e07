//! The speech engines of this process, loaded once (at start-up when
//! `calls.preload_models`, else at first use) on a blocking thread, and
//! shared by every agent check and every call.

use std::sync::Arc;

use tokio::sync::OnceCell;
use voxgate_agents::{Engines, EnginesConfig};

use crate::{Error, Result};

pub struct SpeechEngines {
    config: EnginesConfig,
    loaded: OnceCell<std::result::Result<Arc<Engines>, String>>,
}

impl SpeechEngines {
    pub fn new(config: EnginesConfig) -> Arc<Self> {
        Arc::new(SpeechEngines { config, loaded: OnceCell::new() })
    }

    /// Whether `model` is a speech engine of this process (local, or hosted
    /// and configured) -- known without loading the models.
    pub fn has_tts(&self, model: &str) -> bool {
        self.config.has_tts(model)
    }

    /// The engines, loading them on first use. A failed load is remembered
    /// (the models do not appear by themselves) and reported as 503.
    pub async fn get(&self) -> Result<Arc<Engines>> {
        let loaded = self
            .loaded
            .get_or_init(|| async {
                let config = self.config.clone();
                let started = std::time::Instant::now();
                let result = tokio::task::spawn_blocking(move || Engines::load(config))
                    .await
                    .map_err(|e| format!("loader panicked: {e}"))
                    .and_then(|r| r.map_err(|e| e.to_string()));
                match &result {
                    Ok(_) => tracing::info!(ms = started.elapsed().as_millis() as u64, "speech engines loaded"),
                    Err(e) => tracing::error!(error = %e, "speech engines failed to load"),
                }
                result
            })
            .await;
        loaded.clone().map_err(|e| {
            Error::Unavailable(format!("voice agents are unavailable: the speech models could not be loaded ({e}); install them with scripts/setup"))
        })
    }
}
