//! The speech engines of this process, loaded once (at start-up when
//! `calls.preload_models`, else at first use) on a blocking thread, and
//! shared by every agent check and every call.
//!
//! The load runs on a task of its own: a request that stops waiting for it
//! (its client went away, or the request timed out while the cores were busy)
//! leaves it running, and the next request waits for the same load instead
//! of starting another.

use std::sync::Arc;

use tokio::sync::watch;
use voxgate_agents::{Engines, EnginesConfig};

use crate::{Error, Result};

/// A finished load: the engines, or why they could not be loaded.
type Loaded = std::result::Result<Arc<Engines>, String>;

/// Where the load of the models stands.
enum Load {
    /// Nothing asked for them yet (they load at first use).
    NotStarted,
    Running,
    Done(Loaded),
}

pub struct SpeechEngines {
    config: EnginesConfig,
    load: watch::Sender<Load>,
}

/// What `/ready` needs to know of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    NotLoaded,
    Loading,
    Loaded,
    Failed,
}

impl SpeechEngines {
    pub fn new(config: EnginesConfig) -> Arc<Self> {
        Arc::new(SpeechEngines { config, load: watch::Sender::new(Load::NotStarted) })
    }

    /// Whether `model` is a speech engine of this process (local, or hosted
    /// and configured) -- known without loading the models.
    pub fn has_tts(&self, model: &str) -> bool {
        self.config.has_tts(model)
    }

    pub fn readiness(&self) -> Readiness {
        match &*self.load.borrow() {
            Load::NotStarted => Readiness::NotLoaded,
            Load::Running => Readiness::Loading,
            Load::Done(Ok(_)) => Readiness::Loaded,
            Load::Done(Err(_)) => Readiness::Failed,
        }
    }

    /// Starts the load unless it has started already.
    pub fn start_loading(self: &Arc<Self>) {
        let starts = self.load.send_if_modified(|load| {
            let first = matches!(load, Load::NotStarted);
            if first {
                *load = Load::Running;
            }
            first
        });
        if !starts {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let config = this.config.clone();
            let started = std::time::Instant::now();
            let result = tokio::task::spawn_blocking(move || Engines::load(config))
                .await
                .map_err(|e| format!("loader panicked: {e}"))
                .and_then(|r| r.map_err(|e| e.to_string()));
            match &result {
                Ok(_) => tracing::info!(ms = started.elapsed().as_millis() as u64, "speech engines loaded"),
                Err(e) => tracing::error!(error = %e, "speech engines failed to load"),
            }
            this.load.send_replace(Load::Done(result));
        });
    }

    /// The engines, loading them on first use. A failed load is remembered
    /// (the models do not appear by themselves) and reported as 503.
    pub async fn get(self: &Arc<Self>) -> Result<Arc<Engines>> {
        self.start_loading();
        let mut rx = self.load.subscribe();
        let loaded = match rx.wait_for(|load| matches!(load, Load::Done(_))).await.as_deref() {
            Ok(Load::Done(loaded)) => loaded.clone(),
            // The sender lives in `self`, which outlives this call.
            _ => Err("the loader is gone".to_owned()),
        };
        loaded.map_err(|e| {
            Error::Unavailable(format!("voice agents are unavailable: the speech models could not be loaded ({e}); install them with scripts/setup"))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn installed() -> EnginesConfig {
        let dir = std::env::var("VOXGATE_MODELS_DIR").unwrap_or_else(|_| format!("{}/models", env!("CARGO_MANIFEST_DIR")));
        EnginesConfig { models_dir: dir.into(), ..EnginesConfig::default() }
    }

    #[tokio::test]
    async fn a_load_goes_on_when_the_request_waiting_for_it_gives_up() {
        let engines = SpeechEngines::new(installed());
        assert_eq!(engines.readiness(), Readiness::NotLoaded);
        // The models take far longer than a millisecond to load.
        assert!(tokio::time::timeout(Duration::from_millis(1), engines.get()).await.is_err());
        assert_eq!(engines.readiness(), Readiness::Loading);
        let first = engines.get().await.expect("models installed by scripts/setup");
        assert_eq!(engines.readiness(), Readiness::Loaded);
        let again = engines.get().await.expect("loaded");
        assert!(Arc::ptr_eq(&first, &again), "loaded once and shared");
    }

    #[tokio::test]
    async fn a_failed_load_is_remembered_and_named() {
        let engines = SpeechEngines::new(EnginesConfig { models_dir: "/nonexistent/models".into(), ..EnginesConfig::default() });
        let err = engines.get().await.err().expect("no models there").to_string();
        assert!(err.contains("scripts/setup"), "{err}");
        assert_eq!(engines.readiness(), Readiness::Failed);
    }
}
