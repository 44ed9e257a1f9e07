//! Where the installed models live, and which engines they make available.
//! `scripts/models` and `voxgate-models prepare` write this layout; the
//! engines only read it.

use std::path::{Path, PathBuf};

/// Files under the models directory (default `models/`).
#[derive(Debug, Clone)]
pub struct ModelPaths {
    pub dir: PathBuf,
    /// Whisper tiny.en, ggml (converted from CTranslate2 at set-up).
    pub whisper: PathBuf,
    /// SmolLM2-135M-Instruct, GGUF Q8_0 (re-quantized at set-up).
    pub llm: PathBuf,
    /// Piper voice (ONNX) and its JSON config (phoneme ids, sample rate).
    pub piper: PathBuf,
    pub piper_config: PathBuf,
    /// Silero VAD (ONNX).
    pub vad: PathBuf,
    /// ONNX Runtime shared library, loaded by `ort` at run time.
    pub onnxruntime: PathBuf,
    /// all-MiniLM-L6-v2 (safetensors, config.json, tokenizer.json), for
    /// the gateway's `/v1/embeddings`.
    pub embeddings: PathBuf,
}

impl ModelPaths {
    pub fn new(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref().to_path_buf();
        ModelPaths {
            whisper: dir.join("asr/ggml-tiny.en.bin"),
            llm: dir.join("llm/smollm2-135m-instruct-q8_0.gguf"),
            piper: dir.join("tts/en_US-joe-medium.onnx"),
            piper_config: dir.join("tts/en_US-joe-medium.onnx.json"),
            vad: dir.join("vad/silero_vad.onnx"),
            onnxruntime: dir.join("runtime/libonnxruntime.so"),
            embeddings: dir.join("embed/all-MiniLM-L6-v2"),
            dir,
        }
    }

    /// The files that are not there, as paths for an error message.
    pub fn missing(&self) -> Vec<String> {
        [&self.whisper, &self.llm, &self.piper, &self.piper_config, &self.vad, &self.onnxruntime]
            .into_iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect()
    }
}
