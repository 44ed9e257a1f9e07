//! Provider channels (seed 002's "channel routing"): upstreams configured
//! under `[[channels]]`, each serving some models, with a priority, a weight
//! and a retry count, and an adapter per API style:
//!
//! - `openai`: OpenAI's media routes. Images: `POST /images/generations`
//!   (the answer's `data[0].url` or `data[0].b64_json`). Videos: `POST
//!   /videos`, polled at `GET /videos/{id}` until `completed`, then `GET
//!   /videos/{id}/content`.
//! - `replicate`: submit and poll, Replicate's protocol. `POST
//!   /models/{model}/predictions` with `{"input": {...}}`, polled at `GET
//!   /predictions/{id}` until `succeeded` / `failed` / `canceled`; the
//!   output is a URL, a list of URLs, or (voice clones) a voice id.
//!
//! Routing tries the channels serving a model by priority (highest first),
//! by weight at random within one priority, and moves on to the next on a
//! 5xx, a 429, a timeout or a connection error; a 4xx other than 429 is the
//! request's fault and fails the job at once. Every submission carries an
//! `Idempotency-Key` that is the same for every run of one job, so a
//! process that dies after the upstream took the task but before the task
//! id was saved does not buy the task twice from an upstream that honours
//! the header (OpenAI's API and most gateways do). Channel URLs and keys come
//! from the operator, not from users, so they do not pass the SSRF guard;
//! the keys are never logged.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::JobKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelStyle {
    Openai,
    Replicate,
}

/// One `[[channels]]` entry.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub name: String,
    pub style: ChannelStyle,
    /// `https://api.example.com/v1`; routes are appended to it.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <key>`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The public model names it serves (for kinds without a model field,
    /// the kind: `clip`, `translate`, `commercial`, `instant-ad`,
    /// `voice-clone`, `photoshoot`).
    pub models: Vec<String>,
    /// Higher is tried first.
    #[serde(default)]
    pub priority: i32,
    /// Share of traffic among channels of the same priority.
    #[serde(default = "one")]
    pub weight: u32,
    /// Further attempts on this channel after a retryable failure, before
    /// the next channel is tried.
    #[serde(default)]
    pub retries: u32,
    /// Limit of one upstream request.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// How often a submitted task is polled.
    #[serde(default = "default_poll")]
    pub poll_interval_ms: u64,
    /// Public model name -> the upstream's name for it.
    #[serde(default)]
    pub model_map: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}
fn default_timeout() -> u64 {
    60
}
fn default_poll() -> u64 {
    2000
}

impl std::fmt::Debug for ChannelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelConfig")
            .field("name", &self.name)
            .field("style", &self.style)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("models", &self.models)
            .field("priority", &self.priority)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

impl ChannelConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.name.is_empty(), "channels: every channel needs a name");
        let url = url::Url::parse(&self.base_url).map_err(|e| anyhow::anyhow!("channels.{}: base_url: {e}", self.name))?;
        anyhow::ensure!(matches!(url.scheme(), "http" | "https"), "channels.{}: base_url must be http(s)", self.name);
        anyhow::ensure!(!self.models.is_empty(), "channels.{}: models must list at least one model", self.name);
        anyhow::ensure!(self.weight > 0, "channels.{}: weight must be at least 1", self.name);
        anyhow::ensure!(self.timeout_secs > 0 && self.poll_interval_ms > 0, "channels.{}: timeout_secs and poll_interval_ms must be at least 1", self.name);
        Ok(())
    }

    /// Whether this channel's protocol can produce `kind`.
    pub fn handles(&self, kind: JobKind) -> bool {
        match self.style {
            ChannelStyle::Replicate => true,
            ChannelStyle::Openai => kind == JobKind::Image || kind.is_video(),
        }
    }

    fn serves(&self, kind: JobKind, model: &str) -> bool {
        self.handles(kind) && self.models.iter().any(|m| m == model)
    }

    fn upstream_model<'a>(&'a self, model: &'a str) -> &'a str {
        self.model_map.get(model).map_or(model, String::as_str)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base_url.trim_end_matches('/'), path.trim_start_matches('/'))
    }
}

/// The configured channels and one HTTP client for all of them.
#[derive(Clone)]
pub struct Channels {
    channels: Vec<ChannelConfig>,
    http: reqwest::Client,
}

/// Why an upstream attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// Worth another channel or a later attempt: 5xx, 429, timeout, network.
    Retryable(String),
    /// The upstream refused the request itself, or the task failed.
    Permanent(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Retryable(m) => write!(f, "retryable: {m}"),
            UpstreamError::Permanent(m) => write!(f, "permanent: {m}"),
        }
    }
}

/// A task an upstream accepted; stored with the job so that a worker that
/// takes the job over after a crash polls it instead of submitting again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    pub channel: String,
    pub task_id: String,
}

/// Where a task is.
#[derive(Debug, Clone, PartialEq)]
pub enum Poll {
    Running { progress: Option<u8> },
    /// Done: files to fetch (with any auth the upstream needs) and what the
    /// upstream said about them.
    Done(Vec<Fetch>, Value),
    Failed(String),
}

/// One output to download.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetch {
    Url { url: String, authorized: bool },
    Bytes { bytes: Vec<u8>, content_type: String },
}

impl Channels {
    pub fn new(channels: Vec<ChannelConfig>) -> Self {
        Channels { channels, http: reqwest::Client::new() }
    }

    /// True when some channel serves `model` for `kind`.
    pub fn serves(&self, kind: JobKind, model: &str) -> bool {
        self.channels.iter().any(|c| c.serves(kind, model))
    }

    /// All public models of every channel.
    pub fn models(&self) -> Vec<(&str, &str)> {
        self.channels.iter().flat_map(|c| c.models.iter().map(move |m| (m.as_str(), c.name.as_str()))).collect()
    }

    pub fn by_name(&self, name: &str) -> Option<&ChannelConfig> {
        self.channels.iter().find(|c| c.name == name)
    }

    /// The channels to try for `model`, in order: priority descending, and
    /// within a priority a weighted random order.
    pub fn route(&self, kind: JobKind, model: &str) -> Vec<&ChannelConfig> {
        self.ordered(|c| c.serves(kind, model))
    }

    /// The `openai` channels serving the chat model `model`, in route order.
    pub fn route_chat(&self, model: &str) -> Vec<&ChannelConfig> {
        self.ordered(|c| c.style == ChannelStyle::Openai && c.models.iter().any(|m| m == model))
    }

    /// `POST {base}/chat/completions` on `c` with `body` (the model renamed
    /// to the upstream's name), for the gateway to relay.
    pub async fn chat(&self, c: &ChannelConfig, mut body: Value) -> Result<reqwest::Response, UpstreamError> {
        if let Some(m) = body["model"].as_str() {
            body["model"] = json!(c.upstream_model(m));
        }
        let resp = self.request(c, reqwest::Method::POST, "chat/completions").json(&body).send().await.map_err(network)?;
        if resp.status().is_server_error() || resp.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(UpstreamError::Retryable(format!("HTTP {}", resp.status())));
        }
        Ok(resp)
    }

    fn ordered(&self, pick: impl Fn(&ChannelConfig) -> bool) -> Vec<&ChannelConfig> {
        let mut groups: BTreeMap<std::cmp::Reverse<i32>, Vec<&ChannelConfig>> = BTreeMap::new();
        for c in self.channels.iter().filter(|c| pick(c)) {
            groups.entry(std::cmp::Reverse(c.priority)).or_default().push(c);
        }
        let mut rng = rand::rng();
        let mut out = Vec::new();
        for (_, mut group) in groups {
            while !group.is_empty() {
                let total: u64 = group.iter().map(|c| u64::from(c.weight)).sum();
                let mut pick = rng.random_range(0..total);
                let i = group
                    .iter()
                    .position(|c| {
                        let w = u64::from(c.weight);
                        if pick < w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                    .unwrap_or(0);
                out.push(group.remove(i));
            }
        }
        out
    }

    fn request(&self, c: &ChannelConfig, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, c.url(path)).timeout(Duration::from_secs(c.timeout_secs));
        if let Some(key) = &c.api_key {
            r = r.bearer_auth(key);
        }
        r
    }

    /// Submits the job to `c` under `idempotency_key`. Images on an `openai`
    /// channel answer at once ([`Poll::Done`] in the second slot); everything
    /// else is a task.
    pub async fn submit(
        &self,
        c: &ChannelConfig,
        kind: JobKind,
        model: &str,
        input: &Value,
        idempotency_key: &str,
    ) -> Result<(Submitted, Option<Poll>), UpstreamError> {
        let upstream = c.upstream_model(model);
        let post = |path: &str| self.request(c, reqwest::Method::POST, path).header("Idempotency-Key", idempotency_key);
        let submitted = |task_id: String| Submitted { channel: c.name.clone(), task_id };
        match c.style {
            ChannelStyle::Openai if kind == JobKind::Image => {
                let size = format!("{}x{}", input["width"].as_u64().unwrap_or(1024), input["height"].as_u64().unwrap_or(1024));
                let body = json!({ "model": upstream, "prompt": input["prompt"], "n": 1, "size": size });
                let v = send_json(post("images/generations").json(&body)).await?;
                let first = &v["data"][0];
                let fetch = if let Some(url) = first["url"].as_str() {
                    Fetch::Url { url: url.to_string(), authorized: false }
                } else if let Some(b64) = first["b64_json"].as_str() {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|_| UpstreamError::Permanent("images/generations: b64_json is not base64".into()))?;
                    Fetch::Bytes { bytes, content_type: "image/png".into() }
                } else {
                    return Err(UpstreamError::Permanent("images/generations: the answer has no data[0].url or b64_json".into()));
                };
                Ok((submitted(String::new()), Some(Poll::Done(vec![fetch], json!({})))))
            }
            ChannelStyle::Openai => {
                let size = match input["resolution"].as_str() {
                    Some("1080p") => "1920x1080",
                    Some("480p") => "854x480",
                    _ => "1280x720",
                };
                let prompt = input.get("script").or_else(|| input.get("prompt")).cloned().unwrap_or(Value::Null);
                let mut body = json!({ "model": upstream, "prompt": prompt, "size": size });
                if let Some(s) = input["duration"].as_u64() {
                    body["seconds"] = json!(s.to_string());
                }
                let v = send_json(post("videos").json(&body)).await?;
                let id = v["id"].as_str().ok_or_else(|| UpstreamError::Permanent("videos: the answer has no id".into()))?;
                Ok((submitted(id.to_string()), None))
            }
            ChannelStyle::Replicate => {
                let mut body_input = input.clone();
                body_input["kind"] = json!(kind.as_str());
                let path = format!("models/{upstream}/predictions");
                let v = send_json(post(&path).json(&json!({ "input": body_input }))).await?;
                let id = v["id"].as_str().ok_or_else(|| UpstreamError::Permanent("predictions: the answer has no id".into()))?;
                Ok((submitted(id.to_string()), None))
            }
        }
    }

    /// Where the task `s` is.
    pub async fn poll(&self, s: &Submitted) -> Result<Poll, UpstreamError> {
        let c = self.by_name(&s.channel).ok_or_else(|| UpstreamError::Permanent(format!("channel '{}' is no longer configured", s.channel)))?;
        match c.style {
            ChannelStyle::Openai => {
                let v = send_json(self.request(c, reqwest::Method::GET, &format!("videos/{}", s.task_id))).await?;
                let progress = v["progress"].as_u64().map(|p| p.min(100) as u8);
                Ok(match v["status"].as_str() {
                    Some("completed") => Poll::Done(vec![Fetch::Url { url: c.url(&format!("videos/{}/content", s.task_id)), authorized: true }], v),
                    Some("failed") => Poll::Failed(v["error"]["message"].as_str().unwrap_or("the upstream video failed").to_string()),
                    _ => Poll::Running { progress },
                })
            }
            ChannelStyle::Replicate => {
                let v = send_json(self.request(c, reqwest::Method::GET, &format!("predictions/{}", s.task_id))).await?;
                Ok(match v["status"].as_str() {
                    Some("succeeded") => {
                        let urls: Vec<&str> = match &v["output"] {
                            Value::String(u) if u.starts_with("http") => vec![u.as_str()],
                            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                            _ => Vec::new(),
                        };
                        let fetches = urls.into_iter().take(20).map(|u| Fetch::Url { url: u.to_string(), authorized: false }).collect();
                        Poll::Done(fetches, v)
                    }
                    Some("failed") | Some("canceled") => Poll::Failed(v["error"].as_str().unwrap_or("the upstream prediction failed").to_string()),
                    Some("starting") => Poll::Running { progress: Some(5) },
                    _ => Poll::Running { progress: v["progress"].as_u64().map(|p| p.min(99) as u8) },
                })
            }
        }
    }

    /// Starts the download of one output.
    pub async fn download(&self, channel: &str, url: &str, authorized: bool) -> Result<reqwest::Response, UpstreamError> {
        let parsed = url::Url::parse(url).map_err(|_| UpstreamError::Permanent("the upstream gave an output URL that does not parse".into()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(UpstreamError::Permanent("the upstream gave an output URL that is not http(s)".into()));
        }
        let c = self.by_name(channel);
        let mut r = self.http.get(parsed).timeout(Duration::from_secs(c.map_or(60, |c| c.timeout_secs) * 10));
        if let (true, Some(key)) = (authorized, c.and_then(|c| c.api_key.as_ref())) {
            r = r.bearer_auth(key);
        }
        let resp = r.send().await.map_err(network)?;
        check_status(resp).await
    }
}

fn network(e: reqwest::Error) -> UpstreamError {
    // Without the URL: a presigned URL may carry a token.
    UpstreamError::Retryable(format!("{}", e.without_url()))
}

async fn check_status(resp: reqwest::Response) -> Result<reqwest::Response, UpstreamError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let detail: String = resp.text().await.unwrap_or_default().chars().take(300).collect();
    let msg = format!("HTTP {status}: {detail}");
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS || status == reqwest::StatusCode::REQUEST_TIMEOUT {
        Err(UpstreamError::Retryable(msg))
    } else {
        Err(UpstreamError::Permanent(msg))
    }
}

async fn send_json(req: reqwest::RequestBuilder) -> Result<Value, UpstreamError> {
    let resp = check_status(req.send().await.map_err(network)?).await?;
    resp.json::<Value>().await.map_err(|e| UpstreamError::Retryable(format!("the upstream answered with invalid JSON: {}", e.without_url())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(name: &str, style: ChannelStyle, models: &[&str], priority: i32, weight: u32) -> ChannelConfig {
        ChannelConfig {
            name: name.into(),
            style,
            base_url: "http://127.0.0.1:9".into(),
            api_key: Some("sk-upstream-secret".into()),
            models: models.iter().map(|s| s.to_string()).collect(),
            priority,
            weight,
            retries: 0,
            timeout_secs: 1,
            poll_interval_ms: 10,
            model_map: BTreeMap::new(),
        }
    }

    #[test]
    fn routes_by_priority_then_weight() {
        let channels = Channels::new(vec![
            channel("low", ChannelStyle::Replicate, &["flux-2-pro"], 0, 1),
            channel("heavy", ChannelStyle::Openai, &["flux-2-pro"], 5, 9),
            channel("light", ChannelStyle::Openai, &["flux-2-pro"], 5, 1),
            channel("other", ChannelStyle::Replicate, &["veo-3.1"], 9, 1),
        ]);
        let mut heavy_first = 0;
        for _ in 0..1000 {
            let order: Vec<&str> = channels.route(JobKind::Image, "flux-2-pro").iter().map(|c| c.name.as_str()).collect();
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], "low", "lower priority last");
            heavy_first += usize::from(order[0] == "heavy");
        }
        assert!((850..=950).contains(&heavy_first), "weight 9:1 gave {heavy_first}/1000");
        assert!(channels.route(JobKind::Image, "ideogram-v3").is_empty());
    }

    #[test]
    fn openai_channels_serve_only_images_and_videos() {
        let channels = Channels::new(vec![channel("oa", ChannelStyle::Openai, &["kling-avatar-v2", "wan-2.6"], 0, 1)]);
        assert!(!channels.serves(JobKind::Avatar, "kling-avatar-v2"));
        assert!(channels.serves(JobKind::BRoll, "wan-2.6"));
    }

    #[test]
    fn debug_output_hides_the_key() {
        let c = channel("x", ChannelStyle::Openai, &["m"], 0, 1);
        assert!(!format!("{c:?}").contains("sk-upstream-secret"));
    }
}
