//! `POST /api/settings`: webhook URLs pass the SSRF guard; the signing
//! secret is shown once.

mod common;

use common::{expect_error, json, TestServer};
use serde_json::json;

const REFUSED: &[&str] = &[
    "http://1.1.1.1/hook",                         // not https
    "https://127.0.0.1/hook",                      // loopback
    "https://localhost/hook",                      // loopback name
    "https://2130706433/hook",                     // 127.0.0.1 in decimal
    "https://0x7f000001/hook",                     // 127.0.0.1 in hex
    "https://0177.0.0.1/hook",                     // 127.0.0.1 in octal
    "https://10.0.0.1/hook",                       // private
    "https://172.16.5.4/hook",                     // private
    "https://192.168.1.1/hook",                    // private
    "https://169.254.169.254/latest/meta-data/",   // cloud metadata (link-local)
    "https://100.64.0.1/hook",                     // CGNAT
    "https://0.0.0.0/hook",                        // this network
    "https://224.0.0.1/hook",                      // multicast
    "https://255.255.255.255/hook",                // broadcast
    "https://[::1]/hook",                          // IPv6 loopback
    "https://[::ffff:127.0.0.1]/hook",             // IPv4-mapped loopback
    "https://[::ffff:a9fe:a9fe]/hook",             // IPv4-mapped metadata
    "https://[64:ff9b::a00:1]/hook",               // NAT64 of 10.0.0.1
    "https://[fd00::1]/hook",                      // IPv6 ULA
    "https://[fe80::1]/hook",                      // IPv6 link-local
    "https://[ff02::1]/hook",                      // IPv6 multicast
    "https://metadata.google.internal/computeMetadata/v1/",
    "https://intranet/hook",                       // single-label name
    "https://user:secret@1.1.1.1/hook",            // credentials in the URL
    "not a url",
];

#[tokio::test]
async fn internal_and_malformed_webhook_urls_are_refused() {
    let s = TestServer::start_with(&[("VOXGATE_RATE_LIMITS__WRITES__REQUESTS", "100")]).await;
    let (_, key) = s.account("enterprise", 0);
    for url in REFUSED {
        let msg = expect_error(s.post("/api/settings", &key, json!({"webhookUrl": url})).await, 400, "BAD_REQUEST").await;
        assert!(msg.contains("webhookUrl"), "{url}: message names the field: {msg}");
    }
    let (_, settings) = json(s.get("/api/settings", &key).await).await;
    assert!(settings["data"]["webhookUrl"].is_null(), "nothing was stored: {settings}");
}

#[tokio::test]
async fn a_public_https_url_is_accepted_and_the_secret_is_shown_once() {
    let s = TestServer::start().await;
    let (_, key) = s.account("enterprise", 0);
    let (status, first) = json(s.post("/api/settings", &key, json!({"webhookUrl": "https://1.1.1.1/hooks/voxgate"})).await).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["data"]["webhookUrl"], "https://1.1.1.1/hooks/voxgate");
    let secret = first["data"]["webhookSecret"].as_str().expect("secret on first set").to_owned();
    assert!(secret.starts_with("whsec_") && secret.len() >= 38);

    // Changing the URL keeps the secret and does not show it again.
    let (_, second) = json(s.post("/api/settings", &key, json!({"webhookUrl": "https://[2606:4700:4700::1111]/v2"})).await).await;
    assert!(second["data"].get("webhookSecret").is_none(), "{second}");
    let (_, shown) = json(s.get("/api/settings", &key).await).await;
    assert_eq!(shown["data"]["webhookUrl"], "https://[2606:4700:4700::1111]/v2");
    assert_eq!(shown["data"]["webhookSecretSet"], true);
    assert!(!shown.to_string().contains(&secret));

    // Asking for rotation shows a new one.
    let (_, rotated) =
        json(s.post("/api/settings", &key, json!({"webhookUrl": "https://1.1.1.1/h", "rotateSecret": true})).await).await;
    let new_secret = rotated["data"]["webhookSecret"].as_str().expect("rotated secret");
    assert_ne!(new_secret, secret);
}
