//! The remote engines against local servers that speak their protocols:
//! an OpenAI-compatible chat endpoint streaming SSE (well, and failing
//! mid-stream) and a hosted TTS endpoint returning raw PCM.

mod common;

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};
use common::{speak, Caller};
use futures_util::stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voxgate_agents::llm::{ChatMessage, RemoteLlm, RemoteLlmConfig, Role};
use voxgate_agents::tts::{HostedTts, HostedTtsConfig, HostedTtsKind};
use voxgate_agents::{AgentConfig, AgentEvent, EnginesConfig, Speaker, ESPEAK};

fn sse(events: Vec<String>, fail_after: Option<usize>) -> Response {
    let n = fail_after.unwrap_or(events.len());
    let mut chunks: Vec<Result<String, std::io::Error>> = events.into_iter().take(n).map(|e| Ok(format!("data: {e}\n\n"))).collect();
    if fail_after.is_some() {
        chunks.push(Err(std::io::Error::other("upstream crashed")));
    } else {
        chunks.push(Ok("data: [DONE]\n\n".into()));
    }
    Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(stream::iter(chunks))).unwrap()
}

fn delta(text: &str) -> String {
    serde_json::json!({ "choices": [{ "index": 0, "delta": { "content": text } }] }).to_string()
}

/// `/ok/v1/chat/completions` streams a fixed answer; `/broken/...` dies
/// after two chunks; both check the bearer key and the request shape.
async fn chat_server() -> SocketAddr {
    async fn chat(fail: bool, headers: HeaderMap, body: Json<serde_json::Value>) -> Result<Response, StatusCode> {
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer sk-test") {
            return Err(StatusCode::UNAUTHORIZED);
        }
        if body["stream"] != true || !body["messages"].is_array() || body["model"] != "remote-model" {
            return Err(StatusCode::BAD_REQUEST);
        }
        let parts = ["We are open", " from nine", " to five.", " See you", " soon!"];
        Ok(sse(parts.iter().map(|p| delta(p)).collect(), fail.then_some(2)))
    }
    /// Says goodbye, then calls the `end_call` tool it was offered.
    async fn goodbye(body: Json<serde_json::Value>) -> Result<Response, StatusCode> {
        if body["tools"][0]["function"]["name"] != "end_call" {
            return Err(StatusCode::BAD_REQUEST);
        }
        let call = serde_json::json!({ "choices": [{ "index": 0, "delta": { "tool_calls": [
            { "index": 0, "id": "call_1", "type": "function", "function": { "name": "end_call", "arguments": "{}" } }
        ] } }] });
        Ok(sse(vec![delta("Goodbye, have a nice day!"), call.to_string()], None))
    }
    /// A model with a small context: refuses a request past 6,000
    /// characters, as an endpoint refuses one past its context, and says
    /// how many messages it was sent.
    async fn small(body: Json<serde_json::Value>) -> Result<Response, StatusCode> {
        let messages = body["messages"].as_array().ok_or(StatusCode::BAD_REQUEST)?;
        let chars: usize = messages.iter().map(|m| m["content"].as_str().map_or(0, str::len)).sum();
        if chars > 6_000 || messages[0]["role"] != "system" {
            return Err(StatusCode::BAD_REQUEST);
        }
        Ok(sse(vec![delta(&format!("{} messages", messages.len()))], None))
    }
    let app = Router::new()
        .route("/small/v1/chat/completions", post(small))
        .route("/goodbye/v1/chat/completions", post(goodbye))
        .route("/ok/v1/chat/completions", post(|h: HeaderMap, b: Json<serde_json::Value>| chat(false, h, b)))
        .route("/broken/v1/chat/completions", post(|h: HeaderMap, b: Json<serde_json::Value>| chat(true, h, b)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn remote(addr: SocketAddr, path: &str) -> RemoteLlmConfig {
    RemoteLlmConfig { models: vec!["remote-model".into()], base_url: format!("http://{addr}/{path}/v1"), api_key: Some("sk-test".into()), timeout_secs: 5, hangup_tool: true, context_tokens: 8_192 }
}

#[tokio::test]
async fn openai_compatible_stream_is_read_to_done() {
    let addr = chat_server().await;
    let llm = RemoteLlm::new(remote(addr, "ok"), reqwest::Client::new());
    let (tx, mut rx) = mpsc::channel(16);
    let reply = llm.generate("remote-model", &[ChatMessage::new(Role::User, "hours?")], &tx, &CancellationToken::new()).await.unwrap();
    assert_eq!(reply.text, "We are open from nine to five. See you soon!");
    assert!(!reply.end_call);
    drop(tx);
    let mut pieces = Vec::new();
    while let Some(p) = rx.recv().await {
        pieces.push(p);
    }
    assert_eq!(pieces.len(), 5, "streamed piece by piece: {pieces:?}");
}

#[tokio::test]
async fn a_long_call_sends_a_model_only_what_fits_its_context() {
    let addr = chat_server().await;
    let mut history = vec![ChatMessage::new(Role::System, "You are the receptionist.")];
    for i in 0..60 {
        history.push(ChatMessage::new(Role::User, format!("question {i}: {}", "words ".repeat(30))));
        history.push(ChatMessage::new(Role::Assistant, format!("answer {i}: {}", "words ".repeat(30))));
    }
    history.push(ChatMessage::new(Role::User, "and the last one?"));
    let (tx, _rx) = mpsc::channel(16);
    let never = CancellationToken::new();
    // Told its context, the client leaves the oldest exchanges out.
    let fits = RemoteLlm::new(RemoteLlmConfig { context_tokens: 2_000, ..remote(addr, "small") }, reqwest::Client::new());
    let reply = fits.generate("remote-model", &history, &tx, &never).await.unwrap();
    let sent: usize = reply.text.trim_end_matches(" messages").parse().unwrap();
    assert!(sent > 3 && sent < history.len(), "{} of {} messages sent", sent, history.len());
    // Told a larger one than the model has, it sends the whole call.
    let too_big = RemoteLlm::new(RemoteLlmConfig { context_tokens: 100_000, ..remote(addr, "small") }, reqwest::Client::new());
    assert!(too_big.generate("remote-model", &history, &tx, &never).await.is_err());
}

#[tokio::test]
async fn a_stream_that_breaks_is_an_error_and_a_bad_key_is_refused() {
    let addr = chat_server().await;
    let (tx, _rx) = mpsc::channel(16);
    let broken = RemoteLlm::new(remote(addr, "broken"), reqwest::Client::new());
    let err = broken.generate("remote-model", &[ChatMessage::new(Role::User, "hours?")], &tx, &CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains("remote-model"), "{err}");
    let bad_key = RemoteLlm::new(RemoteLlmConfig { api_key: Some("wrong".into()), ..remote(addr, "ok") }, reqwest::Client::new());
    let err = bad_key.generate("remote-model", &[ChatMessage::new(Role::User, "hi")], &tx, &CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_remote_llm_fails_mid_stream_the_agent_says_the_fallback_line_and_the_call_goes_on() {
    let addr = chat_server().await;
    let fallback = "Sorry, one moment please.";
    let engines = common::engines_with(EnginesConfig { remote_llms: vec![remote(addr, "broken")], fallback_line: fallback.into(), ..EnginesConfig::default() });
    let config = AgentConfig { llm_model: "remote-model".into(), tts_model: ESPEAK.into(), system_prompt: "Be brief.".into(), ..AgentConfig::default() };
    let mut caller = Caller::answer(engines, config).await;
    for turn in 1..=2 {
        caller.push(&speak("What are your opening hours?")).await;
        let before = caller.log.len();
        let at = caller.silence_until(30_000, |e| matches!(e, AgentEvent::Transcript(t) if t.speaker == Speaker::Agent && t.is_final)).await;
        let _ = before;
        let AgentEvent::Transcript(t) = &caller.log[at].1 else { unreachable!() };
        assert_eq!(t.text, fallback, "turn {turn}: {:?}", caller.summary());
        caller.log.clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_model_that_calls_end_call_hangs_up_after_its_goodbye() {
    let addr = chat_server().await;
    let engines = common::engines_with(EnginesConfig { remote_llms: vec![remote(addr, "goodbye")], ..EnginesConfig::default() });
    let config = AgentConfig { llm_model: "remote-model".into(), tts_model: ESPEAK.into(), system_prompt: "Be brief.".into(), ..AgentConfig::default() };
    let mut caller = Caller::answer(engines, config).await;
    caller.push(&speak("That is all, thank you.")).await;
    let at = caller.silence_until(30_000, |e| matches!(e, AgentEvent::Hangup(_))).await;
    assert_eq!(caller.log[at].1, AgentEvent::Hangup(voxgate_agents::HangupReason::AgentEnded));
    let said = caller.log[..at].iter().rev().find_map(|(_, e)| match e {
        AgentEvent::Transcript(t) if t.speaker == Speaker::Agent && t.is_final => Some(t.text.clone()),
        _ => None,
    });
    assert_eq!(said.as_deref(), Some("Goodbye, have a nice day!"), "the goodbye was spoken in full before the hang-up");
}

/// An ElevenLabs-style endpoint: checks the key header, the model and the
/// PCM format asked for, and answers with a 440 Hz tone.
#[tokio::test]
async fn hosted_tts_speaks_the_provider_protocol() {
    async fn tts(headers: HeaderMap, uri: axum::http::Uri, body: Json<serde_json::Value>) -> Result<Vec<u8>, StatusCode> {
        if headers.get("xi-api-key").and_then(|v| v.to_str().ok()) != Some("el-key") {
            return Err(StatusCode::UNAUTHORIZED);
        }
        if body["model_id"] != "eleven_v3" || body["text"] != "Hello there." || !uri.query().unwrap_or_default().contains("output_format=pcm_16000") {
            return Err(StatusCode::BAD_REQUEST);
        }
        Ok((0..16_000).flat_map(|i| (((i as f32 * 440.0 * std::f32::consts::TAU / 16_000.0).sin() * 8_000.0) as i16).to_le_bytes()).collect())
    }
    let app = Router::new().route("/v1/text-to-speech/{voice}/stream", post(tts));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = HostedTtsConfig { base_url: format!("http://{addr}"), api_key: Some("el-key".into()), timeout_secs: 5 };
    let tts_client = HostedTts::new(HostedTtsKind::ElevenLabs, config.clone(), reqwest::Client::new());
    let pcm = tts_client.synthesize("Hello there.", None, 1.0).await.unwrap();
    assert_eq!(pcm.len(), 16_000);
    let wrong = HostedTts::new(HostedTtsKind::ElevenLabs, HostedTtsConfig { api_key: Some("nope".into()), ..config }, reqwest::Client::new());
    assert!(wrong.synthesize("Hello there.", None, 1.0).await.unwrap_err().to_string().contains("401"));
}
