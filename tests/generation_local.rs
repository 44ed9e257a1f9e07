//! The generation routes served by this process's own models: voice jobs
//! rendered by the agents' TTS, and `/v1/chat/completions` on the local
//! SmolLM2, called with OpenAI's request shapes, streaming and not, and by
//! the official `openai` Python client.

mod common;

use std::time::Duration;

use common::voice::balance;
use common::{expect_error, json, wait_job, TestServer};
use serde_json::{json, Value};

/// Seconds of 16-bit mono audio in a WAV, after checking its header.
fn wav_seconds(bytes: &[u8]) -> f64 {
    assert_eq!(&bytes[..4], b"RIFF");
    assert_eq!(&bytes[8..16], b"WAVEfmt ");
    let rate = u32::from_le_bytes(bytes[24..28].try_into().unwrap());
    let data = u32::from_le_bytes(bytes[40..44].try_into().unwrap());
    assert_eq!(data as usize, bytes.len() - 44);
    f64::from(data) / 2.0 / f64::from(rate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_jobs_are_spoken_by_the_local_engines() {
    let server = TestServer::start().await;
    let (_, key) = server.account("enterprise", 1000);
    let text = "Thank you for calling Bright Dental. We are open Monday to Friday. How can I help you today?";
    let (status, queued) = json(server.post("/api/generate/voice", &key, json!({"text": text})).await).await;
    assert_eq!(status, 200, "{queued}");
    assert_eq!(queued["data"]["estimatedMinutes"], 1);
    let (_, slow) = json(server.post("/api/generate/voice", &key, json!({"text": text, "model": "espeak", "speed": 0.5, "language": "de"})).await).await;
    expect_error(server.post("/api/generate/voice", &key, json!({"text": "Bonjour", "language": "fr"})).await, 400, "BAD_REQUEST").await;
    assert_eq!(balance(&server, &key).await, 1000 - 160);

    let piper = wait_job(&server, &key, queued["data"]["jobId"].as_str().unwrap(), Duration::from_secs(120)).await;
    assert_eq!(piper["status"], "completed", "{piper:#}");
    assert_eq!((piper["outputType"].clone(), piper["metadata"]["model"].clone()), (json!("audio/wav"), json!("piper")));
    let audio = server.http.get(piper["outputUrl"].as_str().unwrap()).send().await.unwrap().bytes().await.unwrap();
    let seconds = wav_seconds(&audio);
    assert!((3.0..15.0).contains(&seconds), "{seconds} s of speech for {} characters", text.len());
    assert!((piper["metadata"]["durationSeconds"].as_f64().unwrap() - seconds).abs() < 0.01);
    // Real speech, not silence.
    let loud = audio[44..].chunks_exact(2).filter(|s| i16::from_le_bytes([s[0], s[1]]).unsigned_abs() > 1000).count();
    assert!(loud > 1000, "{loud} loud samples");

    let espeak = wait_job(&server, &key, slow["data"]["jobId"].as_str().unwrap(), Duration::from_secs(120)).await;
    assert_eq!(espeak["status"], "completed", "{espeak:#}");
    assert_eq!(espeak["metadata"]["language"], "de");
    let half_speed = espeak["metadata"]["durationSeconds"].as_f64().unwrap();
    assert!(half_speed > seconds, "speed 0.5 is slower: {half_speed} s vs {seconds} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_on_the_local_model_streaming_and_not() {
    let server = TestServer::start().await;
    let (_, key) = server.account("enterprise", 10);
    let request = json!({
        "model": "smollm2-135m",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}
        ],
        "max_tokens": 40,
        "temperature": 0,
    });
    let (status, reply) = json(server.post("/v1/chat/completions", &key, request.clone()).await).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    assert!(reply["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(content.contains("Paris"), "{content}");
    assert_eq!(reply["choices"][0]["message"]["role"], "assistant");
    let usage = &reply["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10);
    assert!((1..=40).contains(&usage["completion_tokens"].as_u64().unwrap()));
    assert_eq!(usage["total_tokens"].as_u64(), Some(usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()));

    // Streamed: the same answer (temperature 0), piece by piece, then [DONE].
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let resp = server.http.post(server.url("/v1/chat/completions")).bearer_auth(&key).json(&streamed).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.len() > 3, "more than one piece: {text}");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(joined, content, "stream and non-stream agree at temperature 0");
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "stop" || c["choices"][0]["finish_reason"] == "length"));
    assert!(chunks.last().unwrap()["usage"]["completion_tokens"].is_u64(), "usage chunk last");

    // A tiny budget ends with finish_reason length.
    let mut short = request.clone();
    short["max_tokens"] = json!(3);
    short["messages"][1]["content"] = json!("Count from one to twenty in words.");
    let (_, reply) = json(server.post("/v1/chat/completions", &key, short).await).await;
    assert_eq!(reply["choices"][0]["finish_reason"], "length", "{reply}");
    assert_eq!(reply["usage"]["completion_tokens"], 3);

    for (bad, what) in [
        (json!({"model": "smollm2-135m", "messages": []}), "messages"),
        (json!({"model": "smollm2-135m", "messages": [{"role": "wizard", "content": "x"}]}), "role"),
        (json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}), "temperature"),
        (json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "n": 2}), "n must be 1"),
        (json!({"messages": [{"role": "user", "content": "x"}]}), "model"),
    ] {
        let (status, body) = json(server.post("/v1/chat/completions", &key, bad).await).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(what), "{what}: {body}");
    }
}

fn cosine(a: &Value, b: &Value) -> f64 {
    let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
    a.iter().zip(b).map(|(x, y)| x.as_f64().unwrap() * y.as_f64().unwrap()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_place_similar_sentences_close() {
    use base64::Engine as _;
    let server = TestServer::start().await;
    let (_, key) = server.account("enterprise", 10);
    let input = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Quarterly revenue grew by ten percent."];
    let (status, body) = json(server.post("/v1/embeddings", &key, json!({"model": "all-MiniLM-L6-v2", "input": input})).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let vectors: Vec<&Value> = data.iter().map(|d| &d["embedding"]).collect();
    for (i, v) in vectors.iter().enumerate() {
        assert_eq!(data[i]["index"], i);
        assert_eq!(v.as_array().unwrap().len(), 384);
        assert!((cosine(v, v) - 1.0).abs() < 1e-4, "unit length");
    }
    let (close, far) = (cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2]));
    assert!(close > 0.8 && far < 0.3, "paraphrase {close}, unrelated {far}");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() >= 20, "{}", body["usage"]);

    // One text alone embeds the same as in a padded batch; base64 carries the same floats.
    let (_, single) = json(server.post("/v1/embeddings", &key, json!({"model": "all-minilm-l6-v2", "input": input[2], "encoding_format": "base64"})).await).await;
    let bytes = base64::engine::general_purpose::STANDARD.decode(single["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let floats: Vec<f64> = bytes.chunks_exact(4).map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap()))).collect();
    assert!(floats.iter().zip(vectors[2].as_array().unwrap()).all(|(a, b)| (a - b.as_f64().unwrap()).abs() < 1e-4));

    for (bad, status) in [
        (json!({"model": "all-minilm-l6-v2", "input": []}), 400),
        (json!({"model": "all-minilm-l6-v2", "input": [[1, 2, 3]]}), 400),
        (json!({"model": "all-minilm-l6-v2", "input": "x", "dimensions": 128}), 400),
        (json!({"model": "text-embedding-3-large", "input": "x"}), 503),
    ] {
        let (got, body) = json(server.post("/v1/embeddings", &key, bad).await).await;
        assert_eq!(got, status, "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
}

/// The official client (installed by scripts/setup into .venv) against the
/// gateway: models, chat, streaming chat, embeddings and errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_against_the_gateway() {
    let python = format!("{}/.venv/bin/python", env!("CARGO_MANIFEST_DIR"));
    assert!(std::path::Path::new(&python).exists(), "scripts/setup installs the openai client into .venv");
    let server = TestServer::start().await;
    let (_, key) = server.account("enterprise", 10);
    let script = r#"
import os, openai
client = openai.OpenAI(base_url=os.environ["BASE"] + "/v1", api_key=os.environ["KEY"])
models = [m.id for m in client.models.list()]
assert "smollm2-135m" in models, models
r = client.chat.completions.create(model="smollm2-135m", max_tokens=20, temperature=0,
    messages=[{"role": "user", "content": "Say hello."}])
assert r.choices[0].message.content, r
assert r.usage.completion_tokens > 0, r
pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model="smollm2-135m", max_tokens=20, temperature=0, stream=True,
    messages=[{"role": "user", "content": "Say hello."}]) if c.choices]
assert "".join(pieces) == r.choices[0].message.content, (pieces, r)
try:
    client.chat.completions.create(model="smollm2-135m", messages=[])
    raise SystemExit("an empty conversation was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.code == "invalid_request", e
e = client.embeddings.create(model="all-minilm-l6-v2", input=["hello world", "goodbye"])
assert len(e.data) == 2 and len(e.data[0].embedding) == 384, e
bad = openai.OpenAI(base_url=os.environ["BASE"] + "/v1", api_key="sk_live_nope")
try:
    bad.models.list()
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.code == "invalid_api_key", e
print("ok")
"#;
    let out = tokio::process::Command::new(&python)
        .args(["-c", script])
        .env("BASE", &server.base)
        .env("KEY", &key)
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.trim() == "ok", "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
}
