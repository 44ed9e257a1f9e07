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
    /// Names this run in the `Idempotency-Key` of each placement.
    run: String,
}

/// How long a request may wait for voxgate's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why voxgate did not place a call: its HTTP status and error code.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub message: String,
}

fn refused(status: u16, v: &Value) -> Refusal {
    Refusal { status, code: v["code"].as_str().unwrap_or("unknown").into(), message: v["error"].as_str().unwrap_or_default().to_owned() }
}

impl Api {
    pub fn new(base: Url, key: String) -> anyhow::Result<Api> {
        Api::with_timeout(base, key, REQUEST_TIMEOUT)
    }

    fn with_timeout(base: Url, key: String, timeout: Duration) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let run = format!("voxgate-loadtest-{nanos:x}-{:x}", std::process::id());
        Ok(Api { http, base, key, run })
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

    /// Places call number `index` of the run; voxgate's call id, or why it
    /// refused.
    pub async fn place(&self, index: u32, agent: &str, number: &str, trunk: Option<&str>) -> Result<String, Refusal> {
        let mut body = json!({"agentId": agent, "phoneNumber": number});
        if let Some(t) = trunk {
            body["trunk"] = json!(t);
        }
        let (status, v) = self.placement("/api/voice-agent/calls/outbound", index, &body).await?;
        match (status, v["data"]["callId"].as_str()) {
            (200 | 201, Some(id)) => Ok(id.to_owned()),
            _ => Err(refused(status, &v)),
        }
    }

    /// Asks for call number `index` of the run, one a provider's media
    /// stream brings in: voxgate's call id and the stream URL to connect
    /// to, or why it refused. (A replay carries no URL, so the call it
    /// names cannot be connected from here: it counts as refused, and
    /// voxgate ends it unbilled when its stream never comes.)
    pub async fn place_stream(&self, index: u32, agent: &str, provider: &str) -> Result<(String, String), Refusal> {
        let body = json!({"agentId": agent, "provider": provider});
        let (status, v) = self.placement("/api/voice-agent/calls/stream", index, &body).await?;
        match (status, v["data"]["callId"].as_str(), v["data"]["url"].as_str()) {
            (201, Some(id), Some(url)) => Ok((id.to_owned(), url.to_owned())),
            _ => Err(refused(status, &v)),
        }
    }

    /// POSTs a placement with this run's `Idempotency-Key` for call
    /// `index`. A request that gets no answer (the client's timeout, a
    /// dropped connection) is sent once more with the same key: voxgate
    /// then returns the call the first one made, if it made one, instead of
    /// placing a second that nobody here would know of.
    async fn placement(&self, path: &str, index: u32, body: &Value) -> Result<(u16, Value), Refusal> {
        let no_answer = |code: &str, message: String| Refusal { status: 0, code: code.into(), message };
        let url = self.url(path).map_err(|e| no_answer("bad-url", e.to_string()))?;
        let key = format!("{}-{index}", self.run);
        let mut failure = String::new();
        for _ in 0..2 {
            let sent = self.http.post(url.clone()).bearer_auth(&self.key).header("Idempotency-Key", &key).json(body).send().await;
            match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    return Ok((status, resp.json().await.unwrap_or(Value::Null)));
                }
                Err(e) => failure = e.to_string(),
            }
        }
        Err(no_answer("unreachable", failure))
    }

    /// Asks voxgate to hang up a call (one that never reached our SIP side).
    pub async fn hangup(&self, call_id: &str) {
        if let Ok(url) = self.url(&format!("/api/voice-agent/calls/{call_id}/hangup")) {
            let _ = self.http.post(url).bearer_auth(&self.key).send().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Reads one HTTP/1.1 request; returns its `Idempotency-Key`.
    async fn idempotency_key(sock: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request ended early");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
            let header = |name: &str| {
                head.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_owned()))
            };
            let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            if body.len() >= length {
                return header("idempotency-key").expect("an Idempotency-Key");
            }
        }
    }

    /// A voxgate that answers none of the first `silent` requests and the
    /// others with a call; returns its URL and the keys it was sent.
    async fn server(silent: usize) -> (Url, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let keys = tokio::spawn(async move {
            let (mut keys, mut held) = (Vec::new(), Vec::new());
            while keys.len() < 2 {
                let Ok(Ok((mut sock, _))) = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await else { break };
                keys.push(idempotency_key(&mut sock).await);
                if keys.len() <= silent {
                    held.push(sock);
                    continue;
                }
                let body = r#"{"data":{"callId":"call-1"}}"#;
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                sock.write_all(resp.as_bytes()).await.unwrap();
            }
            keys
        });
        (url, keys)
    }

    #[tokio::test]
    async fn a_placement_left_unanswered_is_sent_again_with_the_same_idempotency_key() {
        let (url, keys) = server(1).await;
        let api = Api::with_timeout(url, "key".into(), Duration::from_millis(500)).unwrap();
        assert_eq!(api.place(7, "agent", "+15550000007", None).await, Ok("call-1".to_owned()));
        let keys = keys.await.unwrap();
        assert_eq!(keys.len(), 2, "sent twice: {keys:?}");
        assert_eq!(keys[0], keys[1], "the second request asks for the call of the first");
        assert!(keys[0].starts_with("voxgate-loadtest-") && keys[0].ends_with("-7"), "{}", keys[0]);
    }

    #[tokio::test]
    async fn a_placement_unanswered_twice_is_a_refusal_with_no_status() {
        let (url, keys) = server(2).await;
        let api = Api::with_timeout(url, "key".into(), Duration::from_millis(300)).unwrap();
        let refusal = api.place(3, "agent", "+15550000003", None).await.unwrap_err();
        assert_eq!((refusal.status, refusal.code.as_str()), (0, "unreachable"));
        assert_eq!(keys.await.unwrap().len(), 2, "tried twice, not more");
    }
}
