//! voxgate-agents: the conversation engine.
//!
//! Turns 20 ms frames of caller audio into agent audio: VAD, turn-taking,
//! barge-in, ASR, LLM (local or OpenAI-compatible) and TTS, with per-turn
//! latency metrics. Knows nothing of SIP or HTTP: the call manager pushes
//! 16 kHz frames in and plays the agent frames that come out.

pub mod asr;
mod chunker;
pub mod embed;
mod engines;
mod error;
pub mod llm;
mod models;
pub mod pool;
pub mod prepare;
mod session;
pub mod tts;
mod turn;
pub mod vad;

pub use engines::{Engines, EnginesConfig, ESPEAK, LOCAL_LLM, PIPER};
pub use error::AgentError;
pub use models::ModelPaths;
pub use llm::Role;
pub use session::{AgentConfig, AgentEvent, HangupReason, Session, Speaker, Transcript, TurnMetrics, FRAME};
pub use turn::TurnConfig;
