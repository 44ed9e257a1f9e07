//! API keys over HTTP: create, list, revoke, rotate; both auth headers;
//! 401 for missing, invalid and revoked keys; 403 for scopes and plans.

mod common;

use common::{expect_error, json, TestServer};
use serde_json::json;

#[tokio::test]
async fn created_key_is_shown_once_and_works_with_both_headers() {
    let s = TestServer::start().await;
    let (_, admin) = s.account("enterprise", 100);

    let (status, body) = json(s.post("/api/keys", &admin, json!({"name": "ci", "scopes": ["usage"]})).await).await;
    assert_eq!(status, 201, "{body}");
    let key = body["data"]["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk_live_") && key.len() >= 8 + 32, "{key}");
    assert_eq!(body["data"]["scopes"], json!(["usage"]));
    let id = body["data"]["id"].as_str().unwrap().to_owned();

    // The listing shows the prefix and metadata but never the secret.
    let listing = s.get("/api/keys", &admin).await.text().await.unwrap();
    assert!(!listing.contains(&key), "secret leaked into the listing");
    let listed: serde_json::Value = serde_json::from_str(&listing).unwrap();
    let entry = listed["data"].as_array().unwrap().iter().find(|k| k["id"] == id.as_str()).unwrap().clone();
    assert_eq!(entry["prefix"].as_str().unwrap(), &key[..16]);
    assert_eq!(entry["name"], "ci");
    assert!(entry["revokedAt"].is_null());
    assert!(entry.get("key").is_none());

    let bearer = s.http.get(s.url("/api/usage")).header("authorization", format!("Bearer {key}")).send().await.unwrap();
    assert_eq!(bearer.status(), 200);
    let x_api_key = s.http.get(s.url("/api/usage")).header("x-api-key", &key).send().await.unwrap();
    assert_eq!(x_api_key.status(), 200);
}

#[tokio::test]
async fn missing_invalid_and_revoked_keys_are_401() {
    let s = TestServer::start().await;
    let (_, admin) = s.account("enterprise", 0);

    let none = s.http.get(s.url("/api/usage")).send().await.unwrap();
    let msg = expect_error(none, 401, "UNAUTHORIZED").await;
    assert!(msg.contains("x-api-key"), "{msg}");

    let wrong = format!("sk_live_{}", "A".repeat(40));
    expect_error(s.get("/api/usage", &wrong).await, 401, "UNAUTHORIZED").await;
    // Right prefix, wrong secret.
    let tampered = format!("{}{}", &admin[..16], "z".repeat(admin.len() - 16));
    expect_error(s.get("/api/usage", &tampered).await, 401, "UNAUTHORIZED").await;
    expect_error(s.get("/api/usage", "garbage").await, 401, "UNAUTHORIZED").await;
    let basic = s.http.get(s.url("/api/usage")).header("authorization", "Basic Zm9vOmJhcg==").send().await.unwrap();
    expect_error(basic, 401, "UNAUTHORIZED").await;

    let (_, created) = json(s.post("/api/keys", &admin, json!({"name": "temp"})).await).await;
    let temp = created["data"]["key"].as_str().unwrap().to_owned();
    let id = created["data"]["id"].as_str().unwrap().to_owned();
    assert_eq!(s.get("/api/usage", &temp).await.status(), 200);
    let (status, revoked) = json(s.delete(&format!("/api/keys/{id}"), &admin).await).await;
    assert_eq!(status, 200);
    assert!(revoked["data"]["revokedAt"].is_string());
    let msg = expect_error(s.get("/api/usage", &temp).await, 401, "UNAUTHORIZED").await;
    assert!(msg.contains("revoked"), "{msg}");
    // Revoking again is harmless; an unknown key is 404.
    assert_eq!(s.delete(&format!("/api/keys/{id}"), &admin).await.status(), 200);
    let unknown = uuid::Uuid::new_v4();
    expect_error(s.delete(&format!("/api/keys/{unknown}"), &admin).await, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn rotation_replaces_the_key_and_revokes_the_old_one() {
    let s = TestServer::start().await;
    let (_, admin) = s.account("enterprise", 0);
    let (_, created) = json(s.post("/api/keys", &admin, json!({"name": "worker", "scopes": ["usage", "settings"]})).await).await;
    let old_key = created["data"]["key"].as_str().unwrap().to_owned();
    let old_id = created["data"]["id"].as_str().unwrap().to_owned();

    let (status, rotated) = json(s.post(&format!("/api/keys/{old_id}/rotate"), &admin, json!({})).await).await;
    assert_eq!(status, 201, "{rotated}");
    let new_key = rotated["data"]["key"].as_str().unwrap();
    assert_ne!(new_key, old_key);
    assert_eq!(rotated["data"]["name"], "worker");
    assert_eq!(rotated["data"]["scopes"], json!(["settings", "usage"]));
    assert_eq!(rotated["data"]["replaces"], old_id.as_str());

    expect_error(s.get("/api/usage", &old_key).await, 401, "UNAUTHORIZED").await;
    assert_eq!(s.get("/api/usage", new_key).await.status(), 200);
    let (_, old) = json(s.get(&format!("/api/keys/{old_id}"), &admin).await).await;
    assert_eq!(old["data"]["replacedBy"], rotated["data"]["id"]);

    let msg = expect_error(s.post(&format!("/api/keys/{old_id}/rotate"), &admin, json!({})).await, 400, "BAD_REQUEST").await;
    assert!(msg.contains("revoked"), "{msg}");
}

#[tokio::test]
async fn missing_scope_is_403() {
    let s = TestServer::start().await;
    let (account, _) = s.account("enterprise", 0);
    let calls_only = s.key_with_scopes(&account, "calls");
    let msg = expect_error(s.get("/api/usage", &calls_only).await, 403, "FORBIDDEN").await;
    assert!(msg.contains("usage"), "{msg}");
    expect_error(s.get("/api/keys", &calls_only).await, 403, "FORBIDDEN").await;
    expect_error(s.post("/api/settings", &calls_only, json!({"webhookUrl": "https://1.1.1.1/"})).await, 403, "FORBIDDEN").await;
}

#[tokio::test]
async fn a_key_cannot_create_a_key_with_more_scopes_than_it_holds() {
    let s = TestServer::start().await;
    let (account, _) = s.account("enterprise", 0);
    let keys_and_usage = s.key_with_scopes(&account, "keys,usage");
    let msg = expect_error(s.post("/api/keys", &keys_and_usage, json!({"name": "x", "scopes": ["*"]})).await, 403, "FORBIDDEN").await;
    assert!(msg.contains("cannot create"), "{msg}");
    expect_error(s.post("/api/keys", &keys_and_usage, json!({"name": "x", "scopes": ["generate"]})).await, 403, "FORBIDDEN").await;
    let (status, body) = json(s.post("/api/keys", &keys_and_usage, json!({"name": "x", "scopes": ["usage"]})).await).await;
    assert_eq!(status, 201, "{body}");
    // Without scopes the new key inherits the creator's.
    let (_, inherited) = json(s.post("/api/keys", &keys_and_usage, json!({"name": "y"})).await).await;
    assert_eq!(inherited["data"]["scopes"], json!(["keys", "usage"]));
}

#[tokio::test]
async fn key_management_needs_the_enterprise_plan() {
    let s = TestServer::start().await;
    let (_, pro) = s.account("pro", 0);
    let msg = expect_error(s.post("/api/keys", &pro, json!({"name": "x"})).await, 403, "FORBIDDEN").await;
    assert!(msg.contains("enterprise"), "{msg}");
    expect_error(s.get("/api/keys", &pro).await, 403, "FORBIDDEN").await;
    // Other endpoints work on any plan.
    assert_eq!(s.get("/api/usage", &pro).await.status(), 200);
}

#[tokio::test]
async fn keys_of_another_account_are_invisible() {
    let s = TestServer::start().await;
    let (_, a) = s.account("enterprise", 0);
    let (_, b) = s.account("enterprise", 0);
    let (_, created) = json(s.post("/api/keys", &a, json!({"name": "mine"})).await).await;
    let id = created["data"]["id"].as_str().unwrap();
    expect_error(s.get(&format!("/api/keys/{id}"), &b).await, 404, "NOT_FOUND").await;
    expect_error(s.delete(&format!("/api/keys/{id}"), &b).await, 404, "NOT_FOUND").await;
    expect_error(s.post(&format!("/api/keys/{id}/rotate"), &b, json!({})).await, 404, "NOT_FOUND").await;
    let (_, listing) = json(s.get("/api/keys", &b).await).await;
    assert!(listing["data"].as_array().unwrap().iter().all(|k| k["id"] != id));
}
