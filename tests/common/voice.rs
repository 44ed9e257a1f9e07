//! Helpers of the voice-agent tests: a server whose trunk points at SIPp,
//! agents, and waiting for a call to reach a state.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{json, TestServer};

/// `voxgate.toml` with one trunk `sipp` at `port`, plus `extra` TOML.
pub fn trunk_config(port: u16, extra: &str) -> String {
    let rtp = super::sipp::free_udp_range(40);
    format!(
        "[sip]\nrtp_port_min = {rtp}\nrtp_port_max = {}\n\n[[sip.trunks]]\nname = \"sipp\"\nhost = \"127.0.0.1\"\nport = {port}\nfrom_user = \"+14155550100\"\n\n{extra}",
        rtp + 40
    )
}

pub const RECEPTIONIST: &str = "You are the receptionist of Bright Dental. The office is open Monday to Friday from 9 AM to 5 PM. \
     Answer in one short sentence.";

/// Creates an agent (Piper + local SmolLM2); returns its id.
///
/// The first agent of a server loads its speech models. On a machine busy
/// with the rest of the suite that can outlast the request's 30 s timeout
/// (503); the load goes on, so this waits for `/ready` and asks once more,
/// as a client would.
pub async fn create_agent(server: &TestServer, key: &str, greeting: &str) -> String {
    let body = json!({"name": "Reception", "systemPrompt": RECEPTIONIST, "greeting": greeting, "ttsModel": "piper", "llmModel": "smollm2-135m"});
    let (mut status, mut created) = json(server.post("/api/voice-agent/agents", key, body.clone()).await).await;
    if status == 503 && created["error"] == "request timed out" {
        server.wait_ready(Duration::from_secs(120)).await;
        (status, created) = json(server.post("/api/voice-agent/agents", key, body).await).await;
    }
    assert_eq!(status, 201, "{created}");
    created["data"]["id"].as_str().expect("id").to_owned()
}

/// Places a call; returns its id.
pub async fn place_call(server: &TestServer, key: &str, agent: &str) -> String {
    let resp = server.post("/api/voice-agent/calls/outbound", key, json!({"agentId": agent, "phoneNumber": "+14155550123"})).await;
    let (status, body) = json(resp).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["status"], "queued");
    body["data"]["callId"].as_str().expect("callId").to_owned()
}

/// The call; waits out the read rate limit (20 per 10 s) when polling hits it.
pub async fn get_call(server: &TestServer, key: &str, id: &str) -> Value {
    get_data(server, key, &format!("/api/voice-agent/calls/{id}")).await
}

/// The `data` of a GET that must succeed; waits out the read rate limit
/// (20 per 10 s) when polling hits it.
pub async fn get_data(server: &TestServer, key: &str, path: &str) -> Value {
    loop {
        let resp = server.get(path, key).await;
        if resp.status() == 429 {
            let secs: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            continue;
        }
        let (status, body) = json(resp).await;
        assert_eq!(status, 200, "{body}");
        return body["data"].clone();
    }
}

/// Polls the call until `done(call)` holds; panics after `within`.
pub async fn wait_call(server: &TestServer, key: &str, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let call = get_call(server, key, id).await;
        if done(&call) {
            return call;
        }
        assert!(Instant::now() < deadline, "call never reached the expected state: {call:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn ended(call: &Value) -> bool {
    !call["endedAt"].is_null()
}

pub async fn balance(server: &TestServer, key: &str) -> u64 {
    let (status, body) = json(server.get("/api/usage", key).await).await;
    assert_eq!(status, 200, "{body}");
    body["data"]["credits"].as_u64().expect("credits")
}

fn words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Share of `expected`'s words found in `heard`.
pub fn recall(expected: &str, heard: &str) -> f64 {
    let heard = words(heard);
    let exp = words(expected);
    exp.iter().filter(|w| heard.contains(w)).count() as f64 / exp.len().max(1) as f64
}

/// Whether `heard` has any words at all.
pub fn has_words(heard: &str) -> bool {
    !words(heard).is_empty()
}

/// What Whisper (the installed model) hears in 16 kHz `pcm`.
pub async fn transcribe(pcm: Vec<f32>) -> String {
    tokio::task::spawn_blocking(move || {
        let paths = voxgate_agents::ModelPaths::new(std::path::Path::new(&super::models_dir()));
        let asr = voxgate_agents::asr::Asr::load(&paths.whisper, 2).expect("whisper model");
        asr.transcribe(&pcm, "en").expect("transcribe")
    })
    .await
    .unwrap()
}

/// Polls `check` until it yields (every 50 ms, for at most `within`).
pub async fn poll<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(v) = check() {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}
