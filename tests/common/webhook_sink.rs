//! A webhook receiver on 127.0.0.1 that keeps what it is sent.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

#[derive(Debug, Clone)]
pub struct Delivery {
    pub signature: String,
    /// When it arrived, and whether the sink refused it with a 503.
    pub at: Instant,
    pub refused: bool,
    pub raw: String,
    pub body: Value,
}

impl Delivery {
    /// Checks `t=<ts>,v1=<hex>` against HMAC-SHA256("<ts>.<body>").
    pub fn signature_valid(&self, secret: &str) -> bool {
        let Some((t, v1)) = self.signature.split_once(',') else { return false };
        let (Some(t), Some(v1)) = (t.strip_prefix("t="), v1.strip_prefix("v1=")) else { return false };
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{}", self.raw).as_bytes());
        hex::decode(v1).is_ok_and(|sig| mac.verify_slice(&sig).is_ok())
    }
}

pub struct WebhookSink {
    pub addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Delivery>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookSink {
    pub async fn start() -> WebhookSink {
        Self::start_failing(0).await
    }

    /// A receiver that is "down" (answers 503) for its first `refusals`
    /// requests; every request is kept either way.
    pub async fn start_failing(refusals: usize) -> WebhookSink {
        let received = Arc::new(Mutex::new(Vec::new()));
        let store = received.clone();
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: String| {
                let store = store.clone();
                async move {
                    let signature = headers.get("x-webhook-signature").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                    let parsed = serde_json::from_str(&body).unwrap_or(Value::Null);
                    let mut store = store.lock().unwrap();
                    let refused = store.len() < refusals;
                    store.push(Delivery { signature, at: Instant::now(), refused, raw: body, body: parsed });
                    if refused { axum::http::StatusCode::SERVICE_UNAVAILABLE } else { axum::http::StatusCode::OK }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        WebhookSink { addr, received, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Waits for `n` deliveries and returns them in arrival order.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.received.lock().unwrap().clone();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
