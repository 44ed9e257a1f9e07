//! Prometheus metrics, kept in a registry owned by `AppState` (no globals),
//! rendered as Prometheus text at `/metrics`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::state::AppState;

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    /// Calls running in this process.
    pub calls_active: IntGauge,
    /// Calls ended, by final status and reason.
    pub calls_ended: IntCounterVec,
    /// End of caller speech to first agent audio, per turn.
    pub voice_to_voice: Histogram,
    /// Answer to the first greeting packet on the wire.
    pub answer_to_greeting: Histogram,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("voxgate_http_requests_total", "HTTP requests by route, method and status"),
            &["method", "route", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("voxgate_http_request_duration_seconds", "HTTP request latency by route and method")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["method", "route"],
        )?;
        let calls_active = IntGauge::new("voxgate_calls_active", "Calls running in this process")?;
        let calls_ended = IntCounterVec::new(
            Opts::new("voxgate_calls_ended_total", "Calls ended, by final status and reason"),
            &["status", "reason"],
        )?;
        let speech_buckets = vec![0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0];
        let voice_to_voice = Histogram::with_opts(
            HistogramOpts::new("voxgate_call_voice_to_voice_seconds", "End of caller speech to first agent audio, per turn")
                .buckets(speech_buckets.clone()),
        )?;
        let answer_to_greeting = Histogram::with_opts(
            HistogramOpts::new("voxgate_call_answer_to_greeting_seconds", "Answer to the first greeting packet on the wire")
                .buckets(speech_buckets),
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(calls_active.clone()))?;
        registry.register(Box::new(calls_ended.clone()))?;
        registry.register(Box::new(voice_to_voice.clone()))?;
        registry.register(Box::new(answer_to_greeting.clone()))?;
        Ok(Metrics { registry, requests, latency, calls_active, calls_ended, voice_to_voice, answer_to_greeting })
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric names, fixed above.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Middleware: counts every request by its route template (not the raw
/// path, so ids do not explode the label set).
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    let m = &state.metrics;
    m.requests.with_label_values(&[&method, &route, response.status().as_str()]).inc();
    m.latency.with_label_values(&[&method, &route]).observe(started.elapsed().as_secs_f64());
    response
}
