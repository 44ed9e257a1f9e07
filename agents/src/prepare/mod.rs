//! One-time model preparation, run by `scripts/setup` through the
//! `voxgate-models` binary: format conversions that turn what the registry
//! packages carry into what the engines load. Nothing here runs while
//! serving.

pub mod gguf;
pub mod whisper;
