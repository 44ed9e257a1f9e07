//! Bad input of every kind gets a 400 in the contract's shape, unknown
//! routes 404, wrong methods 405: never a 500, a panic or a hang.

mod common;

use common::{expect_error, TestServer};
use serde_json::json;

#[tokio::test]
async fn malformed_bodies_are_400_with_a_message() {
    let s = TestServer::start().await;
    let (_, key) = s.account("enterprise", 0);
    let post = |body: &'static str, content_type: &'static str| {
        s.http.post(s.url("/api/keys")).bearer_auth(&key).header("content-type", content_type).body(body).send()
    };

    let msg = expect_error(post("{\"name\": ", "application/json").await.unwrap(), 400, "BAD_REQUEST").await;
    assert!(msg.contains("malformed JSON"), "{msg}");
    let msg = expect_error(post("{\"name\": 42}", "application/json").await.unwrap(), 400, "BAD_REQUEST").await;
    assert!(msg.contains("name"), "{msg}");
    let msg = expect_error(post("{}", "application/json").await.unwrap(), 400, "BAD_REQUEST").await;
    assert!(msg.contains("name"), "{msg}");
    let msg = expect_error(post("{\"name\": \"a\", \"nmae\": 1}", "application/json").await.unwrap(), 400, "BAD_REQUEST").await;
    assert!(msg.contains("nmae"), "unknown field is named: {msg}");
    let msg = expect_error(post("{\"name\": \"a\", \"scopes\": [\"phone\"]}", "application/json").await.unwrap(), 400, "BAD_REQUEST").await;
    assert!(msg.contains("phone"), "unknown enum value is named: {msg}");
    let msg = expect_error(post("{\"name\": \"a\"}", "text/plain").await.unwrap(), 400, "BAD_REQUEST").await;
    assert!(msg.contains("Content-Type"), "{msg}");
    expect_error(post("[1,2,3]", "application/json").await.unwrap(), 400, "BAD_REQUEST").await;
    expect_error(post("\u{0}\u{1}", "application/json").await.unwrap(), 400, "BAD_REQUEST").await;

    let msg = expect_error(s.post("/api/keys", &key, json!({"name": ""})).await, 400, "BAD_REQUEST").await;
    assert!(msg.contains("1-100"), "{msg}");
    let long = "x".repeat(101);
    expect_error(s.post("/api/keys", &key, json!({"name": long})).await, 400, "BAD_REQUEST").await;
    expect_error(s.post("/api/keys", &key, json!({"name": "a", "scopes": []})).await, 400, "BAD_REQUEST").await;
}

#[tokio::test]
async fn oversize_body_is_400() {
    let s = TestServer::start_with(&[("VOXGATE_MAX_BODY_BYTES", "4096")]).await;
    let (_, key) = s.account("enterprise", 0);
    let huge = format!("{{\"name\": \"{}\"}}", "a".repeat(10_000));
    let resp = s.http.post(s.url("/api/keys")).bearer_auth(&key).header("content-type", "application/json").body(huge).send().await.unwrap();
    let msg = expect_error(resp, 400, "BAD_REQUEST").await;
    assert!(msg.contains("too large"), "{msg}");
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let s = TestServer::start().await;
    let (_, key) = s.account("enterprise", 0);
    expect_error(s.get("/api/does-not-exist", &key).await, 404, "NOT_FOUND").await;
    expect_error(s.http.get(s.url("/nope")).send().await.unwrap(), 404, "NOT_FOUND").await;
    let put = s.http.put(s.url("/api/usage")).bearer_auth(&key).send().await.unwrap();
    expect_error(put, 405, "METHOD_NOT_ALLOWED").await;
    // A malformed key id is simply not found.
    expect_error(s.get("/api/keys/not-a-uuid", &key).await, 404, "NOT_FOUND").await;
}
