//! Speech recognition with whisper.cpp (through `whisper-rs`). One context
//! (the weights) per process, one state per decode: states are cheap next to
//! the weights, and a fresh state keeps concurrent calls independent.

use std::path::Path;

use whisper_rs::{FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters};

use crate::error::AgentError;

/// Whisper's audio context is 1500 frames for 30 s; whisper.cpp may run the
/// encoder on a shorter window, which is most of the speed-up on short
/// utterances (the quality holds when the window covers the audio plus a
/// margin).
const FRAMES_PER_SECOND: f32 = 50.0;
const MAX_AUDIO_CTX: i32 = 1500;

/// A loaded Whisper model.
pub struct Asr {
    ctx: WhisperContext,
    threads: i32,
}

impl Asr {
    /// Loads the ggml model at `path`; `threads` per decode.
    pub fn load(path: &Path, threads: usize) -> Result<Self, AgentError> {
        let path_str = path.to_str().ok_or_else(|| AgentError::Model("whisper path is not UTF-8".into()))?;
        if !path.is_file() {
            return Err(AgentError::Model(format!("whisper model {path_str} not found (run scripts/setup)")));
        }
        let ctx = WhisperContext::new_with_params(path_str, WhisperContextParameters::default())
            .map_err(|e| AgentError::Model(format!("whisper: {e}")))?;
        Ok(Asr { ctx, threads: threads.max(1) as i32 })
    }

    /// Transcribes 16 kHz mono PCM in [-1, 1]. Blocking: call it from the
    /// inference pool.
    pub fn transcribe(&self, pcm: &[f32], language: &str) -> Result<String, AgentError> {
        let err = |e: whisper_rs::WhisperError| AgentError::Inference(format!("whisper: {e}"));
        let mut state = self.ctx.create_state().map_err(err)?;
        let mut params = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
        params.set_n_threads(self.threads);
        params.set_language(Some(language));
        params.set_no_context(true);
        params.set_no_timestamps(true);
        params.set_single_segment(true);
        params.set_print_special(false);
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_timestamps(false);
        params.set_suppress_blank(true);
        params.set_audio_ctx(audio_ctx_for(pcm.len()));
        // whisper.cpp refuses less than one second; pad short audio with
        // silence rather than lose a short answer ("yes").
        let mut padded;
        let audio = if pcm.len() < 16_000 + 1_600 {
            padded = pcm.to_vec();
            padded.resize(16_000 + 1_600, 0.0);
            &padded[..]
        } else {
            pcm
        };
        state.full(params, audio).map_err(err)?;
        let mut text = String::new();
        for seg in state.as_iter() {
            text.push_str(&seg.to_str_lossy().map_err(err)?);
        }
        Ok(clean(&text))
    }
}

/// Encoder window for `samples` of 16 kHz audio: the audio plus a margin of
/// one second, rounded up to a multiple of 64 frames, never above 30 s.
pub fn audio_ctx_for(samples: usize) -> i32 {
    let seconds = samples as f32 / 16_000.0 + 1.0;
    let frames = (seconds * FRAMES_PER_SECOND).ceil() as i32;
    (((frames + 63) / 64) * 64).clamp(128, MAX_AUDIO_CTX)
}

/// Drops Whisper's non-speech annotations ("[BLANK_AUDIO]", "(music)").
fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut depth = 0;
    for c in text.chars() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_ctx_grows_with_audio_and_is_capped() {
        assert_eq!(audio_ctx_for(0), 128);
        assert_eq!(audio_ctx_for(16_000 * 3), 256);
        assert_eq!(audio_ctx_for(16_000 * 40), MAX_AUDIO_CTX);
    }

    #[test]
    fn annotations_are_removed() {
        assert_eq!(clean(" [BLANK_AUDIO] Hello (music) there. "), "Hello there.");
    }
}
