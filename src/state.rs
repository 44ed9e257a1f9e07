//! `AppState`: everything a request handler may use, built once in
//! `server::build_state` and passed by axum's `State`.

use std::sync::Arc;

use crate::auth::usage_recorder::KeyUsageRecorder;
use crate::config::Config;
use crate::db::Db;
use crate::jobs::worker::Jobs;
use crate::limits::RequestLimiter;
use crate::metrics::Metrics;
use crate::net::ssrf::SsrfGuard;
use crate::voice::engines::SpeechEngines;
use crate::voice::manager::CallManager;
use crate::webhooks::Webhooks;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    pub limiter: Arc<RequestLimiter>,
    pub metrics: Arc<Metrics>,
    pub ssrf: SsrfGuard,
    pub key_usage: KeyUsageRecorder,
    pub engines: Arc<SpeechEngines>,
    pub calls: CallManager,
    pub webhooks: Webhooks,
    pub jobs: Jobs,
}
