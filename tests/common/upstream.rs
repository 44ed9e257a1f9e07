//! A fake provider on 127.0.0.1 that speaks the two channel protocols for
//! real: OpenAI's `/v1/images/generations`, `/v1/videos` (with its poll
//! and `/content` routes) and `/v1/chat/completions`, and Replicate's
//! `/r/models/{m}/predictions` with `/r/predictions/{id}`. It counts what
//! it is asked, can fail on demand, and can hold tasks "processing" until
//! released. Like OpenAI's API it honours `Idempotency-Key`: a submission
//! that repeats a key gets the task of the first one back.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};

/// A 1x1 PNG.
pub const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4, 0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x00, 0x01,
    0x00, 0x00, 0x05, 0x00, 0x01, 0x0d, 0x0a, 0x2d, 0xb4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];
/// Stands in for an MP4 (only its bytes are compared).
pub const MP4: &[u8] = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isomfake-video";
pub const KEY: &str = "sk-upstream-test";
/// `[ssrf]` that trusts loopback, where the fake provider's media URLs and
/// the webhook receivers live.
pub const TRUST_LOOPBACK: &str = "[ssrf]\nallow_networks = [\"127.0.0.1/32\"]\nallow_http_in_allowed_networks = true\n\n";

#[derive(Default)]
pub struct Upstream {
    /// Requests per route ("POST /v1/images/generations", "submit <model>", ...).
    pub hits: HashMap<String, usize>,
    /// Answer 500 to this many submissions (of any kind) before behaving.
    pub fail_submissions: usize,
    /// Tasks stay processing while this is true, and a submission whose
    /// input says "stall-submit" makes its task but answers only after it is
    /// false (as if the answer were lost in a crash).
    pub hold: bool,
    /// Polls a task answers "processing" before it ends.
    pub polls_needed: usize,
    tasks: HashMap<String, Task>,
    /// Idempotency-Key -> the task it made.
    keys: HashMap<String, String>,
    next: usize,
}

struct Task {
    kind: String,
    input: Value,
    polls: usize,
}

#[derive(Clone)]
pub struct FakeUpstream {
    pub addr: std::net::SocketAddr,
    pub state: Arc<Mutex<Upstream>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let state = Arc::new(Mutex::new(Upstream { polls_needed: 1, ..Default::default() }));
        let app = Router::new()
            .route("/v1/images/generations", post(image))
            .route("/v1/videos", post(video_submit))
            .route("/v1/videos/{id}", get(video_poll))
            .route("/v1/videos/{id}/content", get(video_content))
            .route("/v1/chat/completions", post(chat))
            .route("/r/models/{model}/predictions", post(predict))
            .route("/r/predictions/{id}", get(prediction))
            .route("/r/files/{name}", get(file))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeUpstream { addr, state, task: Arc::new(task) }
    }

    pub fn openai_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn replicate_url(&self) -> String {
        format!("http://{}/r", self.addr)
    }

    pub fn hits(&self, what: &str) -> usize {
        self.state.lock().unwrap().hits.get(what).copied().unwrap_or(0)
    }

    /// How many tasks were made (a replayed Idempotency-Key makes none).
    pub fn tasks(&self) -> usize {
        self.state.lock().unwrap().tasks.len()
    }

    pub fn set(&self, f: impl FnOnce(&mut Upstream)) {
        f(&mut self.state.lock().unwrap());
    }
}

type Shared = State<Arc<Mutex<Upstream>>>;

fn hit(s: &mut Upstream, what: impl Into<String>) {
    *s.hits.entry(what.into()).or_default() += 1;
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {KEY}"))
}

fn refuse_or_fail(s: &mut Upstream, headers: &HeaderMap) -> Option<Response> {
    if !authorized(headers) {
        return Some((StatusCode::UNAUTHORIZED, Json(json!({"error": {"message": "bad key"}}))).into_response());
    }
    if s.fail_submissions > 0 {
        s.fail_submissions -= 1;
        return Some((StatusCode::INTERNAL_SERVER_ERROR, "upstream down").into_response());
    }
    None
}

async fn image(State(s): Shared, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let mut s = s.lock().unwrap();
    hit(&mut s, "POST /v1/images/generations");
    if let Some(r) = refuse_or_fail(&mut s, &headers) {
        return r;
    }
    if body["prompt"].as_str().is_some_and(|p| p.contains("refuse-me")) {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": "content policy"}}))).into_response();
    }
    assert_eq!(body["n"], 1);
    hit(&mut s, format!("size {}", body["size"].as_str().unwrap_or("")));
    Json(json!({"created": 1, "data": [{"b64_json": base64::engine::general_purpose::STANDARD.encode(PNG)}]})).into_response()
}

/// The task for this submission: the one an earlier submission with the
/// same Idempotency-Key made, or a new one.
fn new_task(s: &mut Upstream, headers: &HeaderMap, kind: &str, input: Value) -> String {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(id) = key.as_ref().and_then(|k| s.keys.get(k)).cloned() {
        hit(s, "replayed submission");
        return id;
    }
    s.next += 1;
    let id = format!("task{}", s.next);
    s.tasks.insert(id.clone(), Task { kind: kind.into(), input, polls: 0 });
    if let Some(k) = key {
        s.keys.insert(k, id.clone());
    }
    id
}

/// Holds the answer to a "stall-submit" submission while `hold` is set.
async fn stall(state: &Arc<Mutex<Upstream>>, input: &Value) {
    if !input.to_string().contains("stall-submit") {
        return;
    }
    while state.lock().unwrap().hold {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn video_submit(State(state): Shared, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let id = {
        let mut s = state.lock().unwrap();
        hit(&mut s, "POST /v1/videos");
        if let Some(r) = refuse_or_fail(&mut s, &headers) {
            return r;
        }
        new_task(&mut s, &headers, "video", body.clone())
    };
    stall(&state, &body).await;
    Json(json!({"id": id, "object": "video", "status": "queued", "progress": 0})).into_response()
}

async fn video_poll(State(s): Shared, Path(id): Path<String>) -> Response {
    let mut s = s.lock().unwrap();
    let (hold, needed) = (s.hold, s.polls_needed);
    let Some(t) = s.tasks.get_mut(&id) else { return StatusCode::NOT_FOUND.into_response() };
    t.polls += 1;
    if hold || t.polls < needed {
        return Json(json!({"id": id, "status": "in_progress", "progress": 40})).into_response();
    }
    Json(json!({"id": id, "status": "completed", "progress": 100, "seconds": t.input["seconds"]})).into_response()
}

async fn video_content(headers: HeaderMap, Path(_id): Path<String>) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    ([("content-type", "video/mp4")], MP4).into_response()
}

async fn chat(State(s): Shared, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let mut s = s.lock().unwrap();
    hit(&mut s, format!("chat {}", body["model"].as_str().unwrap_or("")));
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    Json(json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "relayed"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    }))
    .into_response()
}

async fn predict(State(state): Shared, headers: HeaderMap, Path(model): Path<String>, Json(body): Json<Value>) -> Response {
    let input = body["input"].clone();
    let id = {
        let mut s = state.lock().unwrap();
        hit(&mut s, format!("submit {model}"));
        if let Some(r) = refuse_or_fail(&mut s, &headers) {
            return r;
        }
        let kind = input["kind"].as_str().unwrap_or("").to_string();
        new_task(&mut s, &headers, &kind, input.clone())
    };
    stall(&state, &input).await;
    Json(json!({"id": id, "status": "starting", "urls": {"get": format!("/r/predictions/{id}")}})).into_response()
}

async fn prediction(State(s): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let host = headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mut s = s.lock().unwrap();
    hit(&mut s, format!("poll {id}"));
    let (hold, needed) = (s.hold, s.polls_needed);
    let Some(t) = s.tasks.get_mut(&id) else { return StatusCode::NOT_FOUND.into_response() };
    t.polls += 1;
    if hold || t.polls < needed {
        return Json(json!({"id": id, "status": "processing"})).into_response();
    }
    let text = t.input.to_string();
    if text.contains("fail-upstream") {
        return Json(json!({"id": id, "status": "failed", "error": "model crashed at /srv/secret/path"})).into_response();
    }
    let file = |n: usize, ext: &str| format!("http://{host}/r/files/{id}-{n}.{ext}");
    let (output, metadata) = match t.kind.as_str() {
        "image" | "photoshoot" => {
            let n = t.input["count"].as_u64().unwrap_or(1) as usize;
            (json!((1..=n).map(|i| file(i, "png")).collect::<Vec<_>>()), json!({}))
        }
        "instant-ad" if t.input["outputFormat"] == "image" => {
            let n = t.input["count"].as_u64().unwrap_or(1) as usize;
            (json!((1..=n).map(|i| file(i, "png")).collect::<Vec<_>>()), json!({}))
        }
        "clip" => (json!([file(1, "mp4"), file(2, "mp4"), file(3, "mp4")]), json!({"viralScores": [9.1, 8.4, 7.7]})),
        "voice" => (json!(file(1, "wav")), json!({"durationSeconds": 2.5})),
        "voice-clone" => (json!({"voice_id": "voice_cloned_42"}), json!({})),
        "commercial" => (json!(file(1, "mp4")), json!({"sceneClips": ["hook", "demo", "cta"]})),
        _ => (json!(file(1, "mp4")), json!({"durationSeconds": 6})),
    };
    Json(json!({"id": id, "status": "succeeded", "output": output, "metadata": metadata})).into_response()
}

async fn file(Path(name): Path<String>) -> Response {
    let (ty, bytes): (&str, &[u8]) = if name.ends_with(".png") {
        ("image/png", PNG)
    } else if name.ends_with(".wav") {
        ("audio/wav", b"RIFF\x24\x00\x00\x00WAVEfake")
    } else {
        ("video/mp4", MP4)
    };
    ([("content-type", ty)], bytes).into_response()
}

/// A `[[channels]]` block.
pub fn channel(name: &str, style: &str, base_url: &str, models: &[&str], priority: i32) -> String {
    let models: Vec<String> = models.iter().map(|m| format!("\"{m}\"")).collect();
    format!(
        "[[channels]]\nname = \"{name}\"\nstyle = \"{style}\"\nbase_url = \"{base_url}\"\napi_key = \"{KEY}\"\nmodels = [{}]\npriority = {priority}\npoll_interval_ms = 50\ntimeout_secs = 10\n\n",
        models.join(", ")
    )
}
