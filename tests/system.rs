//! Health, readiness, metrics, the OpenAPI document, usage and shutdown.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{json, TestServer};

#[tokio::test]
async fn health_and_ready() {
    let s = TestServer::start().await;
    let (status, body) = json(s.http.get(s.url("/health")).send().await.unwrap()).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = json(s.http.get(s.url("/ready")).send().await.unwrap()).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
}

#[tokio::test]
async fn ready_waits_for_the_speech_models_a_server_preloads() {
    let s = TestServer::start_with(&[("VOXGATE_CALLS__PRELOAD_MODELS", "true")]).await;
    s.wait_ready(Duration::from_secs(120)).await;
    // Ready means loaded: the models list names the local LLM.
    let (_, key) = s.account("pro", 100);
    let (status, body) = json(s.get("/v1/models", &key).await).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.to_string().contains("smollm2-135m"), "{body}");
}

#[tokio::test]
async fn ready_is_503_when_the_database_is_gone() {
    let mut s = TestServer::start().await;
    if !common::backend_is_postgres() {
        eprintln!("runs in the PostgreSQL pass only: an open SQLite pool cannot lose its database");
        return;
    }
    assert!(s.db.destroy());
    let resp = s.http.get(s.url("/ready")).send().await.unwrap();
    common::expect_error(resp, 503, "SERVICE_UNAVAILABLE").await;
    // Liveness does not depend on the database.
    assert_eq!(s.http.get(s.url("/health")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn openapi_lists_every_route() {
    let s = TestServer::start().await;
    let (status, doc) = json(s.http.get(s.url("/api/openapi")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let expected: BTreeSet<String> = [
        "GET /api/keys",
        "POST /api/keys",
        "GET /api/keys/{id}",
        "DELETE /api/keys/{id}",
        "POST /api/keys/{id}/rotate",
        "GET /api/usage",
        "GET /api/org",
        "POST /api/auth/token",
        "GET /api/settings",
        "POST /api/settings",
        "GET /health",
        "GET /ready",
        "GET /metrics",
        "GET /api/openapi",
        "GET /api/voice-agent/agents",
        "POST /api/voice-agent/agents",
        "GET /api/voice-agent/agents/{id}",
        "PATCH /api/voice-agent/agents/{id}",
        "DELETE /api/voice-agent/agents/{id}",
        "POST /api/voice-agent/calls/outbound",
        "POST /api/voice-agent/calls/stream",
        "POST /api/voice-agent/agents/{id}/web-call",
        "GET /api/voice-agent/calls",
        "GET /api/voice-agent/calls/{id}",
        "POST /api/voice-agent/calls/{id}/hangup",
        "POST /api/generate/image",
        "POST /api/generate/video",
        "POST /api/generate/voice",
        "POST /api/generate/voice-clone",
        "POST /api/generate/avatar",
        "POST /api/generate/clip",
        "POST /api/generate/b-roll",
        "POST /api/generate/text2video",
        "POST /api/generate/commercial",
        "POST /api/generate/translate",
        "POST /api/generate/instant-ad",
        "POST /api/generate/photoshoot",
        "GET /api/jobs",
        "GET /api/jobs/{id}",
        "GET /api/webhooks/deliveries",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(documented, expected);
    // Every documented route is served (none of them 404s as unknown).
    let (_, key) = s.account("enterprise", 0);
    for route in &expected {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path.replace("{id}", &uuid::Uuid::new_v4().to_string());
        let resp = s.http.request(method.parse().unwrap(), s.url(&path)).bearer_auth(&key).json(&serde_json::json!({})).send().await.unwrap();
        let body = resp.text().await.unwrap();
        assert!(!body.contains("no such endpoint"), "{route} is not served");
    }
    assert!(doc["components"]["securitySchemes"]["x-api-key"].is_object());
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let s = TestServer::start().await;
    let (_, key) = s.account("enterprise", 0);
    for _ in 0..3 {
        assert_eq!(s.get("/api/usage", &key).await.status(), 200);
    }
    assert_eq!(s.http.get(s.url("/api/usage")).send().await.unwrap().status(), 401);
    let text = s.http.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let count = |status: &str| -> u64 {
        text.lines()
            .find(|l| {
                l.starts_with("voxgate_http_requests_total{")
                    && l.contains("route=\"/api/usage\"")
                    && l.contains(&format!("status=\"{status}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("200"), 3, "{text}");
    assert_eq!(count("401"), 1, "{text}");
    assert!(text.contains("voxgate_http_request_duration_seconds_bucket"));
}

#[tokio::test]
async fn usage_reports_balance_plan_and_cycle() {
    let s = TestServer::start().await;
    let (account, key) = s.account("creator", 4500);
    s.cli(&["credits", "grant", &account, "500"]);
    let (status, body) = json(s.get("/api/usage", &key).await).await;
    assert_eq!(status, 200);
    let d = &body["data"];
    assert_eq!(d["credits"], 5000);
    assert_eq!(d["plan"], "creator");
    assert_eq!(d["used"]["images"], 0);
    assert_eq!(d["used"]["creditsSpent"], 0);
    assert!(d["billingCycle"]["start"].as_str().unwrap().ends_with("-01T00:00:00Z"));
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() {
    let mut s = TestServer::start().await;
    assert_eq!(s.http.get(s.url("/health")).send().await.unwrap().status(), 200);
    assert!(s.terminate(Duration::from_secs(15)), "voxgate exits 0 after SIGTERM");
    assert!(s.http.get(s.url("/health")).send().await.is_err(), "port is closed");
}
