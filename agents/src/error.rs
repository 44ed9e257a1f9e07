//! The one error type of the conversation engine.

/// What can go wrong while loading models or running a conversation.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A model file is missing, malformed or failed to load.
    #[error("model: {0}")]
    Model(String),
    /// An agent asked for an engine that is not installed or configured.
    #[error("{0}")]
    Unavailable(String),
    /// Inference failed at run time.
    #[error("inference: {0}")]
    Inference(String),
    /// A remote engine (OpenAI-compatible LLM, hosted TTS) failed.
    #[error("remote engine: {0}")]
    Remote(String),
    /// The engine is shutting down or the session ended.
    #[error("session closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
