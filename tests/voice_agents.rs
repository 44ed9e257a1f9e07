//! `/api/voice-agent/agents` against the real server and its installed
//! models: bounds, model checks, ownership, and the agent's life.

mod common;

use common::{expect_error, json, TestServer};
use serde_json::{json, Value};

fn agent(overrides: Value) -> Value {
    let mut a = json!({
        "name": "Reception",
        "systemPrompt": "You are a helpful receptionist.",
        "greeting": "Hello!",
        "ttsModel": "piper",
        "llmModel": "smollm2-135m",
    });
    for (k, v) in overrides.as_object().unwrap() {
        a[k] = v.clone();
    }
    a
}

#[tokio::test]
async fn agents_are_created_listed_changed_and_deleted() {
    let server = TestServer::start().await;
    let (_, key) = server.account("enterprise", 100);
    let (status, body) = json(
        server
            .post(
                "/api/voice-agent/agents",
                &key,
                agent(json!({"voice": "joe", "maxDurationSeconds": 600, "endCallPhrases": ["goodbye"], "language": "en-US"})),
            )
            .await,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let created = &body["data"];
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["ttsModel"], "piper");
    assert_eq!(created["maxDurationSeconds"], 600);
    assert_eq!(created["endCallPhrases"], json!(["goodbye"]));
    assert_eq!(created["language"], "en-US");

    let (_, list) = json(server.get("/api/voice-agent/agents", &key).await).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let (status, patched) = json(
        server.http.patch(server.url(&format!("/api/voice-agent/agents/{id}"))).bearer_auth(&key).json(&json!({"greeting": "Hi there!", "ttsModel": "espeak"})).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["data"]["greeting"], "Hi there!");
    assert_eq!(patched["data"]["ttsModel"], "espeak");
    assert_eq!(patched["data"]["name"], "Reception");

    let (_, other_key) = server.account("enterprise", 100);
    expect_error(server.get(&format!("/api/voice-agent/agents/{id}"), &other_key).await, 404, "NOT_FOUND").await;
    expect_error(server.delete(&format!("/api/voice-agent/agents/{id}"), &other_key).await, 404, "NOT_FOUND").await;

    let resp = server.delete(&format!("/api/voice-agent/agents/{id}"), &key).await;
    assert_eq!(resp.status(), 204);
    expect_error(server.get(&format!("/api/voice-agent/agents/{id}"), &key).await, 404, "NOT_FOUND").await;
    expect_error(server.get("/api/voice-agent/agents/not-a-uuid", &key).await, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn out_of_bounds_fields_and_unavailable_models_are_400_naming_them() {
    let server = TestServer::start().await;
    let (account, key) = server.account("enterprise", 100);
    let cases = [
        (json!({"name": ""}), "name"),
        (json!({"name": "x".repeat(101)}), "name"),
        (json!({"systemPrompt": ""}), "systemPrompt"),
        (json!({"systemPrompt": "x".repeat(20_001)}), "systemPrompt"),
        (json!({"greeting": "x".repeat(1_001)}), "greeting"),
        (json!({"maxDurationSeconds": 5}), "maxDurationSeconds"),
        (json!({"language": "e n"}), "language"),
        (json!({"language": "de"}), "language 'de'"),
        (json!({"ttsModel": "elevenlabs-v3"}), "ttsModel 'elevenlabs-v3'"),
        (json!({"ttsModel": "nope"}), "ttsModel 'nope'"),
        (json!({"llmModel": "gpt-4o"}), "llmModel 'gpt-4o'"),
        (json!({"endCallPhrases": vec!["bye"; 11]}), "endCallPhrases"),
        (json!({"unknownField": 1}), "unknownField"),
    ];
    for (overrides, field) in cases {
        let msg = expect_error(server.post("/api/voice-agent/agents", &key, agent(overrides.clone())).await, 400, "BAD_REQUEST").await;
        assert!(msg.contains(field), "{overrides}: {msg}");
    }
    let msg = expect_error(server.post("/api/voice-agent/agents", &key, agent(json!({"ttsModel": "elevenlabs-v3"}))).await, 400, "BAD_REQUEST").await;
    assert!(msg.contains("[agents.elevenlabs]"), "says how to enable it: {msg}");
    // The whole 20,000 characters are accepted.
    let (status, body) = json(server.post("/api/voice-agent/agents", &key, agent(json!({"systemPrompt": "x".repeat(20_000), "greeting": ""}))).await).await;
    assert_eq!(status, 201, "{body}");

    let calls_only = server.key_with_scopes(&account, "calls");
    expect_error(server.post("/api/voice-agent/agents", &calls_only, agent(json!({}))).await, 403, "FORBIDDEN").await;
}
