//! Hosted TTS engines, as clients of their public HTTP APIs. Each returns raw
//! 16-bit little-endian PCM (the format every one of them offers for
//! telephony), read to the end and resampled to 16 kHz.
//!
//! - ElevenLabs v3: `POST /v1/text-to-speech/{voice}/stream?output_format=pcm_16000`,
//!   header `xi-api-key`, body `{text, model_id: "eleven_v3"}`.
//! - Fish Audio S1: `POST /v1/tts`, bearer key, header `model: s1`, body
//!   `{text, format: "pcm", sample_rate: 16000, reference_id}`.
//! - Kokoro (Kokoro-FastAPI and other OpenAI-style servers):
//!   `POST /v1/audio/speech`, body `{model: "kokoro", input, voice,
//!   response_format: "pcm", speed}`, 24 kHz.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::to_16k;
use crate::error::AgentError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostedTtsKind {
    ElevenLabs,
    FishAudio,
    Kokoro,
}

impl HostedTtsKind {
    /// The `ttsModel` value that selects this engine.
    pub fn model_name(self) -> &'static str {
        match self {
            HostedTtsKind::ElevenLabs => "elevenlabs-v3",
            HostedTtsKind::FishAudio => "fish-audio-s1",
            HostedTtsKind::Kokoro => "kokoro",
        }
    }

    fn default_voice(self) -> &'static str {
        match self {
            // ElevenLabs' "Rachel", Kokoro's default American voice.
            HostedTtsKind::ElevenLabs => "21m00Tcm4TlvDq8ikWAM",
            HostedTtsKind::FishAudio => "",
            HostedTtsKind::Kokoro => "af_heart",
        }
    }
}

/// Configuration of one hosted engine: where and with which key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostedTtsConfig {
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_timeout() -> u64 {
    10
}

#[derive(Clone)]
pub struct HostedTts {
    kind: HostedTtsKind,
    config: HostedTtsConfig,
    http: reqwest::Client,
}

impl HostedTts {
    pub fn new(kind: HostedTtsKind, config: HostedTtsConfig, http: reqwest::Client) -> Self {
        HostedTts { kind, config, http }
    }

    pub fn kind(&self) -> HostedTtsKind {
        self.kind
    }

    pub async fn synthesize(&self, text: &str, voice: Option<&str>, speed: f32) -> Result<Vec<i16>, AgentError> {
        let base = self.config.base_url.trim_end_matches('/');
        let voice = voice.filter(|v| !v.is_empty()).unwrap_or(self.kind.default_voice());
        let key = self.config.api_key.as_deref().unwrap_or_default();
        let (req, rate) = match self.kind {
            HostedTtsKind::ElevenLabs => (
                self.http
                    .post(format!("{base}/v1/text-to-speech/{voice}/stream?output_format=pcm_16000"))
                    .header("xi-api-key", key)
                    .json(&serde_json::json!({ "text": text, "model_id": "eleven_v3", "voice_settings": { "speed": speed } })),
                16_000,
            ),
            HostedTtsKind::FishAudio => (
                self.http
                    .post(format!("{base}/v1/tts"))
                    .bearer_auth(key)
                    .header("model", "s1")
                    .json(&serde_json::json!({ "text": text, "format": "pcm", "sample_rate": 16000, "reference_id": voice, "prosody": { "speed": speed } })),
                16_000,
            ),
            HostedTtsKind::Kokoro => {
                let mut r = self.http.post(format!("{base}/v1/audio/speech")).json(&serde_json::json!({
                    "model": "kokoro", "input": text, "voice": voice, "response_format": "pcm", "speed": speed
                }));
                if !key.is_empty() {
                    r = r.bearer_auth(key);
                }
                (r, 24_000)
            }
        };
        let name = self.kind.model_name();
        let resp = req
            .timeout(Duration::from_secs(self.config.timeout_secs.max(1)))
            .send()
            .await
            .map_err(|e| AgentError::Remote(format!("{name}: {e}")))?;
        if !resp.status().is_success() {
            return Err(AgentError::Remote(format!("{name}: HTTP {}", resp.status())));
        }
        let body = resp.bytes().await.map_err(|e| AgentError::Remote(format!("{name}: {e}")))?;
        let pcm: Vec<i16> = body.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
        to_16k(&pcm, rate)
    }
}
