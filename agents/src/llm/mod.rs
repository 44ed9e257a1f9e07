//! Language models: the local SmolLM2 (candle, GGUF) and any
//! OpenAI-compatible endpoint. Both stream text deltas into a channel and
//! stop as soon as the session cancels them (barge-in).

mod chat;
mod llama;
mod local;
mod q8;
mod remote;
mod tokenizer;

pub use chat::{ChatMessage, Role};
pub use local::{generate_sliced, prefill, Generating, Generation, LocalConversation, LocalLlm, Reply};
pub use remote::{RemoteLlm, RemoteLlmConfig, RemoteReply};

/// How many tokens an agent reply may have: a spoken turn is short, and a
/// bound keeps a runaway generation from holding the pool.
pub const MAX_REPLY_TOKENS: usize = 120;
