//! Per-key rate limits with the contract's numbers and headers.

mod common;

use common::{expect_error, json, TestServer};
use serde_json::json;

fn header(resp: &reqwest::Response, name: &str) -> u64 {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number"))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn twenty_first_read_in_ten_seconds_is_429_with_retry_after() {
    let s = TestServer::start().await;
    let (account, key) = s.account("enterprise", 0);
    let mut last_remaining = u64::MAX;
    for i in 0..20 {
        let resp = s.get("/api/usage", &key).await;
        assert_eq!(resp.status(), 200, "read {i}");
        assert_eq!(header(&resp, "x-ratelimit-limit"), 20);
        let remaining = header(&resp, "x-ratelimit-remaining");
        assert!(remaining < last_remaining, "remaining decreases");
        last_remaining = remaining;
        let reset = header(&resp, "x-ratelimit-reset");
        assert!(reset >= unix_now() && reset <= unix_now() + 11, "reset {reset} is within the 10 s window");
    }
    let limited = s.get("/api/usage", &key).await;
    assert_eq!(header(&limited, "x-ratelimit-remaining"), 0);
    let retry_after = header(&limited, "retry-after");
    assert!((1..=10).contains(&retry_after), "Retry-After {retry_after}");
    let msg = expect_error(limited, 429, "RATE_LIMITED").await;
    assert_eq!(msg, "Too many requests");

    // Limits are per key: another key of the same account is unaffected.
    let other = s.key_with_scopes(&account, "*");
    assert_eq!(s.get("/api/usage", &other).await.status(), 200);
}

#[tokio::test]
async fn eleventh_delete_in_a_minute_is_429() {
    let s = TestServer::start().await;
    let (_, key) = s.account("enterprise", 0);
    let mut ids = Vec::new();
    for i in 0..11 {
        let (status, body) = json(s.post("/api/keys", &key, json!({"name": format!("k{i}")})).await).await;
        assert_eq!(status, 201);
        ids.push(body["data"]["id"].as_str().unwrap().to_owned());
        // Writes have their own window (20/10 s); stay inside it.
        if i == 9 {
            tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        }
    }
    for id in &ids[..10] {
        let resp = s.delete(&format!("/api/keys/{id}"), &key).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-ratelimit-limit"), 10);
    }
    let limited = s.delete(&format!("/api/keys/{}", ids[10]), &key).await;
    let retry_after = header(&limited, "retry-after");
    assert!((1..=6).contains(&retry_after), "one delete frees every 6 s: {retry_after}");
    expect_error(limited, 429, "RATE_LIMITED").await;
}

#[tokio::test]
async fn configured_quota_replenishes() {
    let s = TestServer::start_with(&[("VOXGATE_RATE_LIMITS__READS__REQUESTS", "2"), ("VOXGATE_RATE_LIMITS__READS__SECONDS", "1")]).await;
    let (_, key) = s.account("enterprise", 0);
    assert_eq!(s.get("/api/usage", &key).await.status(), 200);
    assert_eq!(s.get("/api/usage", &key).await.status(), 200);
    let limited = s.get("/api/usage", &key).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(header(&limited, "x-ratelimit-limit"), 2);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(s.get("/api/usage", &key).await.status(), 200);
}
