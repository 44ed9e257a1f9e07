//! voxgate's HTTP API as the load test uses it: an agent to call with,
//! outbound calls, and hang-ups for calls that never reached us.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use url::Url;

use crate::options::Options;

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: Url,
    key: String,
}

/// Why voxgate did not place a call: its HTTP status and error code.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Api {
    pub fn new(base: Url, key: String) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        Ok(Api { http, base, key })
    }

    fn url(&self, path: &str) -> anyhow::Result<Url> {
        Ok(self.base.join(path)?)
    }

    /// The agent to call with: `--agent` after checking it exists, or a new one.
    pub async fn agent(&self, o: &Options) -> anyhow::Result<String> {
        if let Some(id) = &o.agent {
            let resp = self.http.get(self.url(&format!("/api/voice-agent/agents/{id}"))?).bearer_auth(&self.key).send().await?;
            let (status, body) = (resp.status(), resp.text().await?);
            if !status.is_success() {
                bail!("agent {id}: {status} {body}");
            }
            return Ok(id.clone());
        }
        let body = json!({
            "name": "voxgate-loadtest",
            "systemPrompt": o.system_prompt,
            "greeting": o.greeting,
            "ttsModel": o.tts_model,
            "llmModel": o.llm_model,
        });
        let resp = self.http.post(self.url("/api/voice-agent/agents")?).bearer_auth(&self.key).json(&body).send().await.context("voxgate is not reachable")?;
        let (status, body) = (resp.status(), resp.text().await?);
        if status.as_u16() != 201 {
            bail!("creating the agent: {status} {body}");
        }
        let v: Value = serde_json::from_str(&body)?;
        v["data"]["id"].as_str().map(str::to_owned).context("no agent id in the answer")
    }

    /// Places a call; voxgate's call id, or why it refused.
    pub async fn place(&self, agent: &str, number: &str, trunk: Option<&str>) -> Result<String, Refusal> {
        let mut body = json!({"agentId": agent, "phoneNumber": number});
        if let Some(t) = trunk {
            body["trunk"] = json!(t);
        }
        let refusal = |status: u16, code: &str, message: String| Refusal { status, code: code.into(), message };
        let url = self.url("/api/voice-agent/calls/outbound").map_err(|e| refusal(0, "bad-url", e.to_string()))?;
        let resp = self.http.post(url).bearer_auth(&self.key).json(&body).send().await.map_err(|e| refusal(0, "unreachable", e.to_string()))?;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        match (status, v["data"]["callId"].as_str()) {
            (200 | 201, Some(id)) => Ok(id.to_owned()),
            _ => Err(refusal(status, v["code"].as_str().unwrap_or("unknown"), v["error"].as_str().unwrap_or_default().to_owned())),
        }
    }

    /// Asks for a call a provider's media stream brings in: voxgate's call
    /// id and the stream URL to connect to, or why it refused.
    pub async fn place_stream(&self, agent: &str, provider: &str) -> Result<(String, String), Refusal> {
        let body = json!({"agentId": agent, "provider": provider});
        let refusal = |status: u16, code: &str, message: String| Refusal { status, code: code.into(), message };
        let url = self.url("/api/voice-agent/calls/stream").map_err(|e| refusal(0, "bad-url", e.to_string()))?;
        let resp = self.http.post(url).bearer_auth(&self.key).json(&body).send().await.map_err(|e| refusal(0, "unreachable", e.to_string()))?;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        match (status, v["data"]["callId"].as_str(), v["data"]["url"].as_str()) {
            (201, Some(id), Some(url)) => Ok((id.to_owned(), url.to_owned())),
            _ => Err(refusal(status, v["code"].as_str().unwrap_or("unknown"), v["error"].as_str().unwrap_or_default().to_owned())),
        }
    }

    /// Asks voxgate to hang up a call (one that never reached our SIP side).
    pub async fn hangup(&self, call_id: &str) {
        if let Ok(url) = self.url(&format!("/api/voice-agent/calls/{call_id}/hangup")) {
            let _ = self.http.post(url).bearer_auth(&self.key).send().await;
        }
    }
}
