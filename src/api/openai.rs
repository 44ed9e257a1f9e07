//! The OpenAI-compatible gateway (seed 002): `/v1/models`,
//! `/v1/chat/completions` (the local LLM, or relayed to an `openai`
//! channel serving the model), `/v1/embeddings` (the local
//! all-MiniLM-L6-v2), `/v1/images/generations` and `/v1/videos`
//! (tasks on the same job queue as `/api/generate/*`, at the same prices),
//! and `/v1/tasks/{id}` to poll any job. Errors on `/v1` take OpenAI's
//! shape `{"error": {"message", "type", "code"}}` ([`reshape_errors`]).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use base64::Engine as _;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voxgate_agents::llm::{generate_sliced, ChatMessage, Generation, LocalLlm};
use voxgate_agents::pool::Urgency;
use voxgate_agents::embed::EMBEDDING_MODEL;
use voxgate_agents::{Role, LOCAL_LLM};

use super::generate::submit_job;
use super::json::ApiJson;
use crate::auth::Auth;
use crate::clock::now_ms;
use crate::domain::Scope;
use crate::jobs::channels::UpstreamError;
use crate::jobs::queue::{self, Job, Source};
use crate::jobs::spec::{self, ImageRequest, VideoRequest};
use crate::jobs::{JobKind, JobStatus};
use crate::state::AppState;
use crate::{Error, Result};

/// Rewrites `{"error","code"}` bodies of `/v1` responses into OpenAI's
/// error shape, so OpenAI clients raise their usual exceptions.
pub async fn reshape_errors(request: Request, next: Next) -> Response {
    let v1 = request.uri().path().starts_with("/v1/");
    let response = next.run(request).await;
    if !v1 || response.status().is_success() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let (Some(message), Some(code)) = (v["error"].as_str(), v["code"].as_str()) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let (kind, code) = match code {
        "BAD_REQUEST" => ("invalid_request_error", "invalid_request"),
        "UNAUTHORIZED" => ("authentication_error", "invalid_api_key"),
        "PAYMENT_REQUIRED" => ("gateway_error", "insufficient_credits"),
        "FORBIDDEN" => ("permission_error", "forbidden"),
        "NOT_FOUND" => ("invalid_request_error", "not_found"),
        "METHOD_NOT_ALLOWED" => ("invalid_request_error", "method_not_allowed"),
        "RATE_LIMITED" => ("rate_limit_error", "rate_limit_exceeded"),
        "SERVICE_UNAVAILABLE" => ("gateway_error", "service_unavailable"),
        _ => ("server_error", "internal_error"),
    };
    let body = json!({ "error": { "message": message, "type": kind, "code": code } }).to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

fn unix_now() -> i64 {
    now_ms() / 1000
}

/// List the models this gateway serves.
pub async fn list_models(State(state): State<AppState>, Auth(_auth): Auth) -> Result<Response> {
    let mut data: Vec<Value> = Vec::new();
    let mut push = |id: &str, owner: &str, category: &str| {
        if !data.iter().any(|m| m["id"] == id) {
            data.push(json!({ "id": id, "object": "model", "created": 0, "owned_by": owner, "category": category }));
        }
    };
    if let Ok(engines) = state.engines.get().await {
        for m in engines.llm_models() {
            push(&m, "voxgate", "chat");
        }
        for m in engines.tts_models() {
            push(m, "voxgate", "audio");
        }
        if engines.embedder().is_some() {
            push(EMBEDDING_MODEL, "voxgate", "embedding");
        }
    }
    for (model, channel) in state.jobs.channels.models() {
        let category = if spec::IMAGE_MODELS.contains(&model) {
            "image"
        } else if spec::VIDEO_MODELS.contains(&model) || spec::AVATAR_MODELS.contains(&model) {
            "video"
        } else if spec::VOICE_MODELS.contains(&model) {
            "audio"
        } else if JobKind::ALL.iter().any(|k| k.as_str() == model) {
            "media"
        } else {
            "chat"
        };
        push(model, channel, category);
    }
    Ok(Json(json!({ "object": "list", "data": data })).into_response())
}

/// One message of a chat request: `content` is a string or a list of
/// parts of which the text ones are read.
#[derive(Debug, Deserialize)]
pub struct InMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

/// OpenAI's chat request; fields this gateway does not use are ignored,
/// as OpenAI clients send many.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<Value>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<u32>,
    seed: Option<u64>,
}

const DEFAULT_MAX_TOKENS: usize = 256;

fn messages(req: &ChatRequest) -> Result<Vec<ChatMessage>> {
    if req.messages.is_empty() {
        return Err(Error::bad_request("messages must hold at least one message"));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => return Err(Error::bad_request(format!("messages[{i}].role '{other}' is not supported (system, developer, user, assistant)"))),
            };
            let content = match &m.content {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts.iter().filter(|p| p["type"] == "text").filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("\n"),
                Value::Null if role == Role::Assistant => String::new(),
                _ => return Err(Error::bad_request(format!("messages[{i}].content must be a string or a list of text parts"))),
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn generation(req: &ChatRequest) -> Result<Generation> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(Error::bad_request("n must be 1"));
    }
    let temperature = req.temperature.unwrap_or(0.7);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(Error::bad_request(format!("temperature must be 0-2 (got {temperature})")));
    }
    let top_p = req.top_p.unwrap_or(0.9);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Error::bad_request(format!("top_p must be above 0 and at most 1 (got {top_p})")));
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).map_or(DEFAULT_MAX_TOKENS, |n| n as usize);
    if max_tokens == 0 {
        return Err(Error::bad_request("max_tokens must be at least 1"));
    }
    Ok(Generation { max_tokens, temperature, top_p })
}

/// What the generation thread sends the handler.
enum Piece {
    Text(String),
    End { length: bool, completion_tokens: usize },
    Failed(String),
}

/// OpenAI's `finish_reason`: the token budget ran out, or the model stopped.
fn finish_reason(length: bool) -> &'static str {
    if length {
        "length"
    } else {
        "stop"
    }
}

/// A chat completion, streamed (`stream: true`, server-sent events) or not.
pub async fn chat_completions(State(state): State<AppState>, Auth(auth): Auth, ApiJson(req): ApiJson<ChatRequest>) -> Result<Response> {
    auth.require(Scope::Generate)?;
    auth.require_model(&req.model)?;
    let msgs = messages(&req)?;
    let opts = generation(&req)?;
    if req.model == LOCAL_LLM {
        if let Ok(engines) = state.engines.get().await {
            if let Some(llm) = engines.local_llm() {
                return local_chat(engines, llm, req, msgs, opts).await;
            }
        }
    }
    relay_chat(&state, req).await
}

async fn local_chat(
    engines: Arc<voxgate_agents::Engines>,
    llm: Arc<LocalLlm>,
    req: ChatRequest,
    msgs: Vec<ChatMessage>,
    opts: Generation,
) -> Result<Response> {
    let prompt_tokens = llm.prompt_tokens(&msgs).map_err(|e| Error::bad_request(format!("messages: {e}")))?;
    if prompt_tokens + opts.max_tokens.min(llm.context() / 2) > llm.context() {
        return Err(Error::bad_request(format!(
            "the messages ({prompt_tokens} tokens) and max_tokens exceed the model's context of {} tokens",
            llm.context()
        )));
    }
    let (tx, mut rx) = mpsc::channel::<Piece>(64);
    let cancel = CancellationToken::new();
    let seed = req.seed.unwrap_or_else(rand::random);
    {
        let (tx, job_tx, job_cancel) = (tx.clone(), tx.clone(), cancel.clone());
        tokio::spawn(async move {
            let conv = Arc::new(Mutex::new(llm.conversation(seed)));
            let stop = job_cancel.clone();
            let on_text = move |t: &str| {
                // A client that went away stops the generation.
                if job_tx.blocking_send(Piece::Text(t.to_string())).is_err() {
                    stop.cancel();
                }
            };
            let piece = match generate_sliced(engines.pool(), &llm, &conv, msgs, opts, &job_cancel, || Urgency::Later, None, on_text).await {
                Ok(r) => Piece::End { length: r.truncated, completion_tokens: r.tokens },
                Err(e) => Piece::Failed(e.to_string()),
            };
            let _ = tx.send(piece).await;
        });
    }
    drop(tx);
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();
    let model = req.model.clone();
    let usage = move |completion: usize| json!({ "prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion });
    if !req.stream {
        let mut text = String::new();
        let (finish, completion) = loop {
            match rx.recv().await {
                Some(Piece::Text(t)) => text.push_str(&t),
                Some(Piece::End { length, completion_tokens }) => break (finish_reason(length), completion_tokens),
                Some(Piece::Failed(e)) => return Err(Error::Internal(anyhow::anyhow!("local LLM: {e}"))),
                None => return Err(Error::Internal(anyhow::anyhow!("local LLM stopped without an answer"))),
            }
        };
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": finish }],
            "usage": usage(completion),
        }))
        .into_response());
    }
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o["include_usage"] == true);
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
    };
    let (events_tx, events_rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let send = |v: Value| events_tx.send(Event::default().data(v.to_string()));
        if send(chunk(json!({ "role": "assistant", "content": "" }), None)).await.is_err() {
            return cancel.cancel();
        }
        while let Some(piece) = rx.recv().await {
            let event = match piece {
                Piece::Text(t) => chunk(json!({ "content": t }), None),
                Piece::End { length, completion_tokens } => {
                    let _ = send(chunk(json!({}), Some(finish_reason(length)))).await;
                    if include_usage {
                        let mut u = chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(completion_tokens);
                        let _ = send(u).await;
                    }
                    break;
                }
                Piece::Failed(e) => {
                    tracing::error!(error = %e, "local LLM failed mid-stream");
                    json!({ "error": { "message": "Internal server error", "type": "server_error", "code": "internal_error" } })
                }
            };
            if send(event).await.is_err() {
                return cancel.cancel();
            }
        }
        let _ = events_tx.send(Event::default().data("[DONE]")).await;
    });
    let stream = futures_util::stream::unfold(events_rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx)) });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

/// Relays the request to the first `openai` channel serving the model that
/// answers (5xx, 429 and network errors move on to the next).
async fn relay_chat(state: &AppState, req: ChatRequest) -> Result<Response> {
    let route = state.jobs.channels.route_chat(&req.model);
    if route.is_empty() {
        return Err(Error::Unavailable(format!(
            "model '{}' is not available: it is neither the local {LOCAL_LLM} nor served by an openai channel",
            req.model
        )));
    }
    let body = raw_chat_body(&req);
    let mut last = String::new();
    for c in route {
        match state.jobs.channels.chat(c, body.clone()).await {
            Ok(resp) => {
                let status = resp.status();
                let content_type = resp.headers().get(header::CONTENT_TYPE).cloned().unwrap_or(HeaderValue::from_static("application/json"));
                let mut out = Response::new(Body::from_stream(resp.bytes_stream()));
                *out.status_mut() = status;
                out.headers_mut().insert(header::CONTENT_TYPE, content_type);
                return Ok(out);
            }
            Err(UpstreamError::Retryable(m)) | Err(UpstreamError::Permanent(m)) => {
                tracing::warn!(channel = %c.name, error = %m, "chat channel failed; trying the next");
                last = m;
            }
        }
    }
    Err(Error::Unavailable(format!("every channel serving '{}' failed (last: {last})", req.model)))
}

/// The request as the upstream should see it (the fields this gateway reads).
fn raw_chat_body(req: &ChatRequest) -> Value {
    let mut body = json!({
        "model": req.model,
        "messages": req.messages.iter().map(|m| json!({ "role": m.role, "content": m.content })).collect::<Vec<_>>(),
        "stream": req.stream,
    });
    for (k, v) in [
        ("max_tokens", req.max_tokens.map(Value::from)),
        ("max_completion_tokens", req.max_completion_tokens.map(Value::from)),
        ("temperature", req.temperature.map(Value::from)),
        ("top_p", req.top_p.map(Value::from)),
        ("seed", req.seed.map(Value::from)),
        ("stream_options", req.stream_options.clone()),
    ] {
        if let Some(v) = v {
            body[k] = v;
        }
    }
    body
}

/// OpenAI's embeddings request.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    model: String,
    /// A string or a list of strings.
    input: Value,
    /// `float` (default) or `base64` (little-endian f32, as OpenAI sends it).
    encoding_format: Option<String>,
    dimensions: Option<usize>,
}

/// Inputs of one embeddings request (OpenAI's limit).
const MAX_INPUTS: usize = 2048;
/// Inputs embedded per pass on the pool, so one large request does not
/// hold a pool slot for long.
const EMBED_BATCH: usize = 32;

/// Embeddings from the local all-MiniLM-L6-v2 (384 dimensions, texts cut
/// at 256 tokens as sentence-transformers does).
pub async fn embeddings(State(state): State<AppState>, Auth(auth): Auth, ApiJson(req): ApiJson<EmbeddingsRequest>) -> Result<Response> {
    auth.require(Scope::Generate)?;
    auth.require_model(&req.model)?;
    let wanted = req.model.rsplit('/').next().unwrap_or_default().to_ascii_lowercase();
    if wanted != EMBEDDING_MODEL {
        return Err(Error::Unavailable(format!("embedding model '{}' is not available; this gateway serves {EMBEDDING_MODEL}", req.model)));
    }
    let texts: Vec<String> = match &req.input {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| Error::bad_request("input must be a string or a list of strings (token arrays are not supported)")))
            .collect::<Result<_>>()?,
        _ => return Err(Error::bad_request("input must be a non-empty string or list of strings")),
    };
    if texts.len() > MAX_INPUTS {
        return Err(Error::bad_request(format!("input may hold at most {MAX_INPUTS} texts (got {})", texts.len())));
    }
    if texts.iter().any(|t| t.is_empty()) {
        return Err(Error::bad_request("input must not contain empty strings"));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(Error::bad_request(format!("encoding_format must be float or base64 (got '{other}')"))),
    };
    let engines = state.engines.get().await?;
    let embedder = engines
        .embedder()
        .ok_or_else(|| Error::Unavailable(format!("embedding model {EMBEDDING_MODEL} is not installed; install it with scripts/setup")))?;
    if req.dimensions.is_some_and(|d| d != embedder.dimensions()) {
        return Err(Error::bad_request(format!("dimensions must be {} for {EMBEDDING_MODEL}", embedder.dimensions())));
    }
    let mut data = Vec::with_capacity(texts.len());
    let mut tokens = 0;
    for chunk in texts.chunks(EMBED_BATCH) {
        let (embedder, chunk) = (embedder.clone(), chunk.to_vec());
        let out = engines.pool().run(Urgency::Later, move || embedder.embed(&chunk)).await.and_then(|r| r).map_err(|e| Error::Internal(e.into()))?;
        tokens += out.tokens;
        for v in out.vectors {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            data.push(json!({ "object": "embedding", "index": data.len(), "embedding": embedding }));
        }
    }
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": EMBEDDING_MODEL,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    }))
    .into_response())
}

/// OpenAI's image request; the gateway queues it as an `image` job.
#[derive(Debug, Deserialize)]
pub struct ImagesRequest {
    prompt: String,
    model: Option<String>,
    n: Option<u32>,
    /// `WIDTHxHEIGHT`.
    size: Option<String>,
    seed: Option<u64>,
    negative_prompt: Option<String>,
    style: Option<String>,
    steps: Option<u32>,
    callback_url: Option<String>,
}

fn no_callback(url: &Option<String>) -> Result<()> {
    match url {
        Some(_) => Err(Error::bad_request(
            "callback_url is not supported: set the account's webhook URL with POST /api/settings to receive job.completed and job.failed",
        )),
        None => Ok(()),
    }
}

fn task(job: &Job) -> Value {
    json!({
        "task_id": job.id,
        "id": job.id,
        "object": format!("gateway.{}.task", job.kind),
        "status": match job.status {
            JobStatus::Queued => "pending",
            JobStatus::Processing => "processing",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
        },
        "model": job.model,
        "created_at": job.created_at / 1000,
    })
}

/// Create an image task (10 credits, as `/api/generate/image`).
pub async fn images_generations(State(state): State<AppState>, Auth(auth): Auth, ApiJson(req): ApiJson<ImagesRequest>) -> Result<Response> {
    auth.require(Scope::Generate)?;
    no_callback(&req.callback_url)?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(Error::bad_request("n must be 1 (one task per image)"));
    }
    let (width, height) = match req.size.as_deref() {
        None | Some("auto") => (None, None),
        Some(s) => {
            let (w, h) = s.split_once('x').ok_or_else(|| Error::bad_request(format!("size must be WIDTHxHEIGHT (got '{s}')")))?;
            let parse = |v: &str| v.parse::<u32>().map_err(|_| Error::bad_request(format!("size must be WIDTHxHEIGHT (got '{s}')")));
            (Some(parse(w)?), Some(parse(h)?))
        }
    };
    let spec = ImageRequest {
        prompt: req.prompt,
        width,
        height,
        steps: req.steps,
        seed: req.seed,
        style: req.style,
        model: req.model,
        negative_prompt: req.negative_prompt,
    };
    let job = submit_job(&state, &auth, spec::prepare(spec, &state.ssrf).await?, Source::V1).await?;
    Ok(Json(task(&job)).into_response())
}

/// OpenAI's video request; the gateway queues it as a `video` job.
#[derive(Debug, Deserialize)]
pub struct VideosRequest {
    prompt: String,
    model: Option<String>,
    /// Seconds, as OpenAI sends it (a string) or a number.
    seconds: Option<Value>,
    /// `1280x720` or `1920x1080`.
    size: Option<String>,
    /// A reference image for image-to-video (HTTPS).
    image_url: Option<String>,
    callback_url: Option<String>,
}

/// Create a video task (250 credits, as `/api/generate/video`).
pub async fn videos(State(state): State<AppState>, Auth(auth): Auth, ApiJson(req): ApiJson<VideosRequest>) -> Result<Response> {
    auth.require(Scope::Generate)?;
    no_callback(&req.callback_url)?;
    let duration = match &req.seconds {
        None => None,
        Some(Value::Number(n)) => Some(n.as_u64().ok_or_else(|| Error::bad_request("seconds must be a whole number"))? as u32),
        Some(Value::String(s)) => Some(s.parse::<u32>().map_err(|_| Error::bad_request("seconds must be a whole number"))?),
        Some(_) => return Err(Error::bad_request("seconds must be a whole number")),
    };
    let resolution = match req.size.as_deref() {
        None => None,
        Some("1280x720") | Some("720x1280") => Some("720p".to_string()),
        Some("1920x1080") | Some("1080x1920") => Some("1080p".to_string()),
        Some(s) => return Err(Error::bad_request(format!("size must be 1280x720, 720x1280, 1920x1080 or 1080x1920 (got '{s}')"))),
    };
    let spec = VideoRequest { script: req.prompt, avatar_image: req.image_url, voice_id: None, duration, resolution, style: None, model: req.model };
    let job = submit_job(&state, &auth, spec::prepare(spec, &state.ssrf).await?, Source::V1).await?;
    Ok(Json(task(&job)).into_response())
}

/// Poll a task (any job of the account).
pub async fn get_task(State(state): State<AppState>, Auth(auth): Auth, Path(id): Path<String>) -> Result<Response> {
    auth.require(Scope::Jobs)?;
    let job = queue::get(&state.db, auth.org, &id).await?;
    let mut v = task(&job);
    v["progress"] = json!(job.progress);
    let urls = state.jobs.storage.signed_urls(&job.outputs, unix_now());
    match job.status {
        JobStatus::Completed => {
            v["completed_at"] = json!(job.finished_at.map(|t| t / 1000));
            v["output"] = json!({ "url": urls.first(), "urls": urls, "type": job.output_type, "metadata": job.metadata });
        }
        JobStatus::Failed => {
            v["failed_at"] = json!(job.finished_at.map(|t| t / 1000));
            v["error"] = json!({ "message": job.error, "code": "generation_failed" });
            v["credits_refunded"] = json!(job.credits_refunded.get());
        }
        _ => {}
    }
    Ok(Json(v).into_response())
}
