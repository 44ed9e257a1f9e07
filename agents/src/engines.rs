//! The process-wide set of engines: models loaded once and shared by every
//! call, remote clients, and the pool they run on. Built once at start-up
//! ([`Engines::load`]); an agent's choice of models is checked against it
//! when the agent is created ([`Engines::check`]), so a call never starts
//! with an engine that is not there.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::asr::Asr;
use crate::embed::Embedder;
use crate::error::AgentError;
use crate::llm::{LocalLlm, RemoteLlm, RemoteLlmConfig};
use crate::models::ModelPaths;
use crate::pool::{InferencePool, Urgency};
use crate::tts::{HostedTts, HostedTtsConfig, HostedTtsKind, Piper};
use crate::vad::{SileroModel, VadStream};

/// The `llmModel` of the local SmolLM2.
pub const LOCAL_LLM: &str = "smollm2-135m";
/// Local `ttsModel` values.
pub const PIPER: &str = "piper";
pub const ESPEAK: &str = "espeak";

/// `[agents]` in voxgate's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnginesConfig {
    pub models_dir: PathBuf,
    /// Inference jobs (ASR, LLM, TTS) that may run at once; default: cores.
    pub pool_size: Option<usize>,
    /// Threads Whisper decodes use in all; default: the pool's size. A
    /// decode runs on one thread, and on more only with the pool slots it
    /// found free (taken for as long as it runs, so no other job starts on
    /// those cores meanwhile: next to LLM and TTS work a multi-threaded
    /// decode spins on its barriers, and four calls on two cores waited
    /// 1.3-1.9 s for a final transcript when other jobs could start during
    /// it). One that finds no thread free waits (more ggml threads than
    /// cores make its spinning barriers livelock).
    pub asr_threads: Option<usize>,
    /// Threads of the Piper session a caller's first words take when they
    /// find pool slots free (taken meanwhile, as for `asr_threads`);
    /// default: the pool's size, 1 for none.
    pub tts_threads: Option<usize>,
    /// Threads the local LLM's products take while no other inference job
    /// runs: 2 (the default), the calling one and a spare thread, or 1.
    /// Asked before each product, so work that starts on the other core
    /// meets the spare thread for one product at most. At one to four calls
    /// on two cores 2 was faster at p50 and p95 (docs/BENCHMARKS.md,
    /// session 17; asked per forward pass instead, it made the slowest
    /// turns of three and four calls 18-25 % slower, session 16).
    pub llm_threads: Option<usize>,
    /// What the agent says when its language model fails mid-call.
    pub fallback_line: String,
    /// OpenAI-compatible endpoints, each serving some `llmModel` names.
    pub remote_llms: Vec<RemoteLlmConfig>,
    pub elevenlabs: Option<HostedTtsConfig>,
    pub fish_audio: Option<HostedTtsConfig>,
    pub kokoro: Option<HostedTtsConfig>,
}

impl EnginesConfig {
    /// The hosted voices that are configured.
    pub fn hosted_tts(&self) -> impl Iterator<Item = (HostedTtsKind, &HostedTtsConfig)> {
        [(HostedTtsKind::ElevenLabs, &self.elevenlabs), (HostedTtsKind::FishAudio, &self.fish_audio), (HostedTtsKind::Kokoro, &self.kokoro)]
            .into_iter()
            .filter_map(|(kind, c)| c.as_ref().map(|c| (kind, c)))
    }

    /// Whether `tts_model` names an engine of this configuration (a local
    /// one, or a configured hosted one), known without loading any model.
    pub fn has_tts(&self, tts_model: &str) -> bool {
        tts_model == PIPER || tts_model == ESPEAK || self.hosted_tts().any(|(kind, _)| kind.model_name() == tts_model)
    }
}

impl Default for EnginesConfig {
    fn default() -> Self {
        EnginesConfig {
            models_dir: PathBuf::from("models"),
            pool_size: None,
            asr_threads: None,
            tts_threads: None,
            llm_threads: None,
            fallback_line: "Sorry, I'm having trouble right now. Could you say that again?".into(),
            remote_llms: Vec::new(),
            elevenlabs: None,
            fish_audio: None,
            kokoro: None,
        }
    }
}

pub struct Engines {
    pub(crate) config: EnginesConfig,
    pub(crate) pool: InferencePool,
    pub(crate) asr: Asr,
    pub(crate) llm: Option<Arc<LocalLlm>>,
    pub(crate) piper: Option<Arc<Piper>>,
    pub(crate) espeak: bool,
    vad: Option<Arc<SileroModel>>,
    embedder: Option<Arc<Embedder>>,
    pub(crate) remote_llms: Vec<RemoteLlm>,
    pub(crate) hosted_tts: Vec<HostedTts>,
    /// Greetings synthesized before: an agent says the same greeting on
    /// every call, and a phone may be answered before synthesis would end.
    pub(crate) greetings: GreetingCache,
}

/// Synthesized greetings by (ttsModel, voice, speed, text), at most
/// [`GreetingCache::CAPACITY`] of them, the least recently used dropped first.
#[derive(Default)]
pub(crate) struct GreetingCache {
    entries: std::sync::Mutex<Vec<(String, Arc<Vec<i16>>)>>,
}

impl GreetingCache {
    const CAPACITY: usize = 256;

    pub(crate) fn key(tts: &str, voice: Option<&str>, speed: f32, text: &str) -> String {
        format!("{tts}\u{1f}{}\u{1f}{speed}\u{1f}{text}", voice.unwrap_or(""))
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<Vec<i16>>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let i = entries.iter().position(|(k, _)| k == key)?;
        let entry = entries.remove(i);
        let pcm = entry.1.clone();
        entries.push(entry);
        Some(pcm)
    }

    pub(crate) fn put(&self, key: String, pcm: Arc<Vec<i16>>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|(k, _)| *k != key);
        if entries.len() >= Self::CAPACITY {
            entries.remove(0);
        }
        entries.push((key, pcm));
    }
}

/// A model that may be missing: logged, and the engine goes without it.
fn optional<T>(what: &str, loaded: Result<T, AgentError>) -> Option<Arc<T>> {
    loaded.map(Arc::new).map_err(|e| tracing::warn!(error = %e, "{what} not available")).ok()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl Engines {
    /// Loads the models under `config.models_dir`. Whisper is required
    /// (there is no call without ASR); the LLM, Piper and Silero are used
    /// when present, and what is missing is logged and refused per agent.
    pub fn load(config: EnginesConfig) -> Result<Arc<Self>, AgentError> {
        whisper_rs::install_logging_hooks();
        let paths = ModelPaths::new(&config.models_dir);
        let pool = InferencePool::new(config.pool_size.unwrap_or_else(cores));
        let asr = Asr::load(&paths.whisper, config.asr_threads.unwrap_or(pool.size()))?;
        // With llm_threads = 2 the LLM's products take the other core too
        // while nothing else runs on the pool (their own job holds one slot).
        let (idle, spare) = (pool.clone(), config.llm_threads.unwrap_or(2) > 1);
        let llm = optional("local LLM", LocalLlm::load(&paths.llm).map(|l| l.with_spare_core(move || spare && idle.size() > 1 && idle.idle_but_one())));
        let onnx = paths.onnxruntime.is_file()
            && ort::init_from(paths.onnxruntime.display().to_string())
                .commit()
                .map_err(|e| tracing::warn!(error = %e, "ONNX Runtime not available"))
                .is_ok();
        let piper = (onnx && paths.piper.is_file()).then(|| optional("Piper", Piper::load(&paths.piper, &paths.piper_config, pool.size(), config.tts_threads.unwrap_or(pool.size())))).flatten();
        let vad = (onnx && paths.vad.is_file()).then(|| optional("Silero VAD (earshot used instead)", SileroModel::load(&paths.vad, 4))).flatten();
        let embedder = paths.embeddings.is_dir().then(|| optional("embeddings model", Embedder::load(&paths.embeddings))).flatten();
        let espeak = std::process::Command::new("espeak-ng").arg("--version").output().is_ok_and(|o| o.status.success());
        let http = reqwest::Client::new();
        let remote_llms = config.remote_llms.iter().cloned().map(|c| RemoteLlm::new(c, http.clone())).collect();
        let hosted_tts = config.hosted_tts().map(|(kind, c)| HostedTts::new(kind, c.clone(), http.clone())).collect();
        Ok(Arc::new(Engines { config, pool, asr, llm, piper, espeak, vad, embedder, remote_llms, hosted_tts, greetings: GreetingCache::default() }))
    }

    /// Transcribes on the calling pool job, on one thread and one more for
    /// each other pool slot free now (held until the decode ends).
    pub(crate) fn transcribe(&self, pcm: &[f32], language: &str, abort: Option<Arc<AtomicBool>>) -> Result<(String, f32), AgentError> {
        let extra = self.pool.try_extra(self.asr.threads() - 1);
        self.asr.transcribe_scored(pcm, language, extra.cores(), abort)
    }

    /// A fresh VAD stream for one call.
    pub fn vad_stream(&self) -> VadStream {
        match &self.vad {
            Some(m) => VadStream::silero(m.clone()),
            None => VadStream::earshot(),
        }
    }

    pub fn pool(&self) -> &InferencePool {
        &self.pool
    }

    /// The sentence embedding model, when installed.
    pub fn embedder(&self) -> Option<Arc<Embedder>> {
        self.embedder.clone()
    }

    /// The local language model, when installed.
    pub fn local_llm(&self) -> Option<Arc<LocalLlm>> {
        self.llm.clone()
    }

    /// `llmModel` values agents may use here.
    pub fn llm_models(&self) -> Vec<String> {
        let mut v: Vec<String> = self.llm.iter().map(|_| LOCAL_LLM.to_string()).collect();
        v.extend(self.remote_llms.iter().flat_map(|r| r.models().to_vec()));
        v
    }

    /// `ttsModel` values agents may use here.
    pub fn tts_models(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.piper.is_some() {
            v.push(PIPER);
        }
        if self.espeak {
            v.push(ESPEAK);
        }
        v.extend(self.hosted_tts.iter().map(|h| h.kind().model_name()));
        v
    }

    /// `text` spoken by `tts_model` (one of [`tts_models`](Self::tts_models))
    /// as 16 kHz mono PCM. Local engines run on the inference pool, queued
    /// by `urgency`.
    pub async fn synthesize(&self, urgency: Urgency, tts_model: &str, voice: Option<&str>, speed: f32, text: &str) -> Result<Vec<i16>, AgentError> {
        match tts_model {
            PIPER => {
                let piper = self.piper.clone().ok_or_else(|| AgentError::Unavailable("piper is not installed".into()))?;
                let (text, speed, pool) = (text.to_string(), speed, self.pool.clone());
                // On the wide session when a caller waits for it and the
                // other slots are free (held meanwhile).
                let most = if urgency.is_now() { piper.wide_threads() - 1 } else { 0 };
                self.pool
                    .run(urgency, move || {
                        // The wide session's threads want every slot they
                        // stand for; short of them, the slots go back.
                        let extra = Some(pool.try_extra(most)).filter(|e| most > 0 && e.cores() > most);
                        piper.synthesize(&text, speed, extra.is_some())
                    })
                    .await?
            }
            ESPEAK => crate::tts::espeak(text, voice.unwrap_or("en-us"), speed).await,
            name => {
                let hosted = self
                    .hosted_tts
                    .iter()
                    .find(|h| h.kind().model_name() == name)
                    .ok_or_else(|| AgentError::Unavailable(format!("ttsModel '{name}' is not configured")))?;
                hosted.synthesize(text, voice, speed).await
            }
        }
    }

    /// Whether `tts_model` can voice a piece on more than one core (Piper
    /// loaded with `tts_threads` above 1).
    pub fn wide_tts(&self, tts_model: &str) -> bool {
        tts_model == PIPER && self.piper.as_ref().is_some_and(|p| p.wide_threads() > 1)
    }

    /// Refuses an LLM, TTS or language this process cannot serve, with a
    /// message that names it and says how to enable it.
    pub fn check(&self, llm_model: &str, tts_model: &str, language: &str) -> Result<(), AgentError> {
        if !self.llm_models().iter().any(|m| m == llm_model) {
            let how = if llm_model == LOCAL_LLM {
                "install the local models with scripts/setup".to_string()
            } else {
                format!("add an OpenAI-compatible endpoint serving it under [[agents.remote_llms]] (models = [\"{llm_model}\"])")
            };
            return Err(AgentError::Unavailable(format!("llmModel '{llm_model}' is not available: {how}")));
        }
        if !self.tts_models().contains(&tts_model) {
            let how = match tts_model {
                PIPER => "install the Piper voice and ONNX Runtime with scripts/setup".to_string(),
                ESPEAK => "install the espeak-ng package".to_string(),
                "elevenlabs-v3" => "configure [agents.elevenlabs] with an api_key".to_string(),
                "fish-audio-s1" => "configure [agents.fish_audio] with an api_key".to_string(),
                "kokoro" => "configure [agents.kokoro] with the base_url of a Kokoro server".to_string(),
                _ => format!("known values are {PIPER}, {ESPEAK}, kokoro, elevenlabs-v3, fish-audio-s1"),
            };
            return Err(AgentError::Unavailable(format!("ttsModel '{tts_model}' is not available: {how}")));
        }
        let lang = language.split(['-', '_']).next().unwrap_or_default().to_ascii_lowercase();
        if lang != "en" {
            return Err(AgentError::Unavailable(format!(
                "language '{language}' is not available: the installed Whisper model (tiny.en) understands English only"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_cache_keeps_the_most_recently_used() {
        let cache = GreetingCache::default();
        let key = |i: usize| GreetingCache::key(PIPER, None, 1.0, &format!("hello {i}"));
        for i in 0..GreetingCache::CAPACITY {
            cache.put(key(i), Arc::new(vec![i as i16]));
        }
        assert_eq!(cache.get(&key(0)).as_deref(), Some(&vec![0]));
        cache.put(key(999), Arc::new(vec![1]));
        assert!(cache.get(&key(1)).is_none(), "the least recently used went");
        assert!(cache.get(&key(0)).is_some() && cache.get(&key(999)).is_some());
        assert_ne!(GreetingCache::key(PIPER, Some("a"), 1.0, "x"), GreetingCache::key(PIPER, None, 1.0, "x"));
    }
}
