//! Any OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`
//! with `stream: true`), read as server-sent events: each `data:` line
//! carries `choices[0].delta.content`, `data: [DONE]` ends the stream.

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::chat::{ChatMessage, Role};
use super::MAX_REPLY_TOKENS;
use crate::error::AgentError;

/// One configured endpoint: the models it serves, where, and its key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteLlmConfig {
    /// Model names an agent may give as `llmModel` to reach this endpoint.
    pub models: Vec<String>,
    /// e.g. `https://api.openai.com/v1`
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<String>,
    /// Seconds to wait for the first byte of a reply.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Offer the model an `end_call` tool (OpenAI function calling) so it
    /// can hang up; turn off for servers that refuse `tools`.
    #[serde(default = "default_hangup_tool")]
    pub hangup_tool: bool,
    /// The models' context window in tokens: a call's oldest exchanges are
    /// left out of a request that would not fit it with a reply (see
    /// [`within_context`]).
    #[serde(default = "default_context_tokens")]
    pub context_tokens: usize,
}

fn default_context_tokens() -> usize {
    8_192
}

/// Characters a token is counted as when a request's size is estimated:
/// English text runs about four a token, so three errs on the side of a
/// shorter request.
const CHARS_PER_TOKEN: usize = 3;
/// Tokens counted for each message's role and markers.
const TOKENS_PER_MESSAGE: usize = 4;

/// `messages` as a request to a model with `context` tokens sends them,
/// room left for a reply: the system prompt, and the newest of the others
/// that fit (the last one always), starting with the caller's words. The
/// size is estimated (the endpoint's tokenizer is not known here): a
/// token per [`CHARS_PER_TOKEN`] characters and [`TOKENS_PER_MESSAGE`] a
/// message.
pub fn within_context(messages: &[ChatMessage], context: usize) -> Vec<ChatMessage> {
    let tokens = |m: &ChatMessage| m.content.chars().count().div_ceil(CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE;
    let head = messages.iter().take_while(|m| m.role == Role::System).count();
    let mut room = context.saturating_sub(MAX_REPLY_TOKENS).saturating_sub(messages[..head].iter().map(tokens).sum());
    let mut first = messages.len();
    for (i, m) in messages.iter().enumerate().skip(head).rev() {
        let t = tokens(m);
        if t > room && i + 1 < messages.len() {
            break;
        }
        room = room.saturating_sub(t);
        first = i;
    }
    // Whole exchanges: once some are left out, what is sent starts with
    // the caller's words.
    while first > head && first + 1 < messages.len() && messages[first].role != Role::User {
        first += 1;
    }
    messages[..head].iter().chain(&messages[first..]).cloned().collect()
}

fn default_hangup_tool() -> bool {
    true
}

/// What a remote model answered: its text, and whether it called `end_call`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteReply {
    pub text: String,
    pub end_call: bool,
}

/// The tool offered to remote models to end the call.
fn end_call_tool() -> serde_json::Value {
    serde_json::json!({
        "type": "function",
        "function": {
            "name": END_CALL,
            "description": "Hang up the phone call. Use it after saying goodbye, when the conversation is over or the caller asks to end the call.",
            "parameters": { "type": "object", "properties": {} }
        }
    })
}

const END_CALL: &str = "end_call";

fn default_timeout() -> u64 {
    10
}

#[derive(Clone)]
pub struct RemoteLlm {
    config: RemoteLlmConfig,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct Chunk {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ToolCallDelta>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
}

impl RemoteLlm {
    pub fn new(config: RemoteLlmConfig, http: reqwest::Client) -> Self {
        RemoteLlm { config, http }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.config.models.iter().any(|m| m == model)
    }

    pub fn models(&self) -> &[String] {
        &self.config.models
    }

    /// Streams the reply to `messages` into `out` as text deltas; returns the
    /// whole reply, and whether the model called `end_call`. An HTTP error,
    /// a malformed event or a stream that ends without `[DONE]` is an error
    /// (the text already sent stays sent).
    pub async fn generate(&self, model: &str, messages: &[ChatMessage], out: &mpsc::Sender<String>, cancel: &CancellationToken) -> Result<RemoteReply, AgentError> {
        let url = format!("{}/chat/completions", self.config.base_url.trim_end_matches('/'));
        let messages = within_context(messages, self.config.context_tokens);
        let mut body = serde_json::json!({ "model": model, "messages": messages, "stream": true, "max_tokens": MAX_REPLY_TOKENS });
        if self.config.hangup_tool {
            body["tools"] = serde_json::json!([end_call_tool()]);
        }
        let mut req = self.http.post(&url).json(&body).timeout(Duration::from_secs(self.config.timeout_secs.max(1) * 6));
        if let Some(key) = &self.config.api_key {
            req = req.bearer_auth(key);
        }
        let first = tokio::time::timeout(Duration::from_secs(self.config.timeout_secs.max(1)), req.send());
        let resp = tokio::select! {
            r = first => r.map_err(|_| AgentError::Remote(format!("{model}: no response within {} s", self.config.timeout_secs)))?,
            _ = cancel.cancelled() => return Ok(RemoteReply::default()),
        }
        .map_err(|e| AgentError::Remote(format!("{model}: {e}")))?;
        if !resp.status().is_success() {
            return Err(AgentError::Remote(format!("{model}: HTTP {}", resp.status())));
        }
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut reply = RemoteReply::default();
        loop {
            let chunk = tokio::select! {
                c = stream.next() => c,
                _ = cancel.cancelled() => return Ok(reply),
            };
            let Some(chunk) = chunk else {
                return Err(AgentError::Remote(format!("{model}: stream ended before [DONE]")));
            };
            buf.extend_from_slice(&chunk.map_err(|e| AgentError::Remote(format!("{model}: {e}")))?);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
                let data = data.trim();
                if data == "[DONE]" {
                    return Ok(reply);
                }
                let chunk: Chunk = serde_json::from_str(data).map_err(|e| AgentError::Remote(format!("{model}: bad event: {e}")))?;
                let Some(delta) = chunk.choices.into_iter().next().map(|c| c.delta) else { continue };
                if delta.tool_calls.iter().any(|t| t.function.as_ref().and_then(|f| f.name.as_deref()) == Some(END_CALL)) {
                    reply.end_call = true;
                }
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    reply.text.push_str(&text);
                    if out.send(text).await.is_err() {
                        return Ok(reply);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(exchanges: usize, chars: usize) -> Vec<ChatMessage> {
        let mut messages = vec![ChatMessage::new(Role::System, "You are the receptionist."), ChatMessage::new(Role::Assistant, "Hello, how can I help?")];
        for i in 0..exchanges {
            messages.push(ChatMessage::new(Role::User, format!("question {i} {}", "x".repeat(chars))));
            messages.push(ChatMessage::new(Role::Assistant, format!("answer {i} {}", "y".repeat(chars))));
        }
        messages.push(ChatMessage::new(Role::User, "and the last one?"));
        messages
    }

    #[test]
    fn a_call_that_fits_is_sent_whole() {
        let messages = call(5, 100);
        assert_eq!(within_context(&messages, 8_192), messages);
        assert!(within_context(&[], 8_192).is_empty());
    }

    #[test]
    fn a_long_call_sends_its_system_prompt_and_newest_exchanges_within_the_context() {
        let messages = call(400, 300);
        let sent = within_context(&messages, 8_192);
        assert_eq!(sent[0], messages[0]);
        assert_eq!(sent[1].role, Role::User, "whole exchanges, from the caller's words");
        assert_eq!(sent.last(), messages.last());
        // The newest ones, in order, with nothing left out between them.
        assert_eq!(sent[1..], messages[messages.len() - (sent.len() - 1)..]);
        let chars: usize = sent.iter().map(|m| m.content.len()).sum();
        assert!(chars / CHARS_PER_TOKEN + sent.len() * TOKENS_PER_MESSAGE + MAX_REPLY_TOKENS <= 8_192, "{chars} characters in {} messages", sent.len());
        // And close to filling it: not much more was left out than needed.
        assert!(chars > 8_192 * CHARS_PER_TOKEN * 8 / 10, "{chars} characters");
    }

    #[test]
    fn a_last_message_longer_than_the_context_is_still_sent() {
        let mut messages = call(3, 10);
        messages.push(ChatMessage::new(Role::User, "z".repeat(40_000)));
        let sent = within_context(&messages, 8_192);
        assert_eq!(sent, vec![messages[0].clone(), messages.last().unwrap().clone()]);
    }
}
