//! `GET /`: the dashboard, one static page (HTML, CSS and plain JavaScript,
//! no build step) that uses the public API with the key its user types in:
//! agents, calls with their status, duration, credits and latency, a call's
//! transcript, and "Test call", which talks to an agent from the browser's
//! microphone over WebRTC (`/api/voice-agent/agents/{id}/web-call`).
//!
//! The key stays in the tab (`sessionStorage`). For automation (the
//! browser test), a URL fragment `#key=...&call=<agent id>&seconds=N`
//! signs in and places a test call of N seconds, and `&show=<call id>`
//! opens a call's transcript; a fragment never reaches the server or its
//! logs.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("dashboard.html");

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page runs only its own inline script and talks only to this origin.
            (header::CONTENT_SECURITY_POLICY, "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; media-src blob: 'self'"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}
