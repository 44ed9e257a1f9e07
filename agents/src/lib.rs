//! voxgate-agents: the conversation engine.
//!
//! Turns 20 ms frames of caller audio into agent audio: VAD, turn-taking,
//! barge-in, ASR, LLM (local or OpenAI-compatible) and TTS, with per-turn
//! latency metrics. Knows nothing of SIP or HTTP. Empty until the issue
//! "The conversation engine" lands.
