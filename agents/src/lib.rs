//! voxgate-agents: the conversation engine.
//!
//! Turns 20 ms frames of caller audio into agent audio: VAD, turn-taking,
//! barge-in, ASR, LLM (local or OpenAI-compatible) and TTS, with per-turn
//! latency metrics. Knows nothing of SIP or HTTP: the call manager pushes
//! 16 kHz frames in and plays the agent frames that come out.

pub mod asr;
mod error;
mod models;
pub mod prepare;

pub use error::AgentError;
pub use models::ModelPaths;
