//! Speech synthesis. Local engines (Piper, espeak-ng) run on the inference
//! pool; hosted engines (ElevenLabs v3, Fish Audio S1, Kokoro behind an
//! OpenAI-style speech endpoint) are HTTP clients. Every engine returns
//! 16 kHz mono PCM, which is what the session cuts into 20 ms frames.

mod espeak;
mod hosted;
mod piper;

pub use espeak::espeak;
pub use hosted::{HostedTts, HostedTtsConfig, HostedTtsKind};
pub use piper::Piper;

use voxgate_media::resample::{frame_len, FrameResampler};

use crate::error::AgentError;

/// The output rate of every engine, the rate of the session's frames.
pub const SAMPLE_RATE: u32 = 16_000;

/// Converts `pcm` at `from` Hz to 16 kHz, 20 ms at a time, and drops the
/// resampler's start-up delay so speech starts on the first sample.
pub fn to_16k(pcm: &[i16], from: u32) -> Result<Vec<i16>, AgentError> {
    if from == SAMPLE_RATE {
        return Ok(pcm.to_vec());
    }
    let mut rs = FrameResampler::new(from, SAMPLE_RATE).map_err(|e| AgentError::Inference(format!("resampler: {e}")))?;
    let delay = (rs.delay_ms() * f64::from(SAMPLE_RATE) / 1000.0).round() as usize;
    let step = frame_len(from);
    let mut out = Vec::with_capacity(pcm.len() * SAMPLE_RATE as usize / from as usize + step);
    let tail = vec![0i16; step * (1 + delay / frame_len(SAMPLE_RATE))];
    for chunk in pcm.chunks(step).chain(tail.chunks(step)) {
        rs.process(chunk, &mut out).map_err(|e| AgentError::Inference(format!("resampler: {e}")))?;
    }
    let want = pcm.len() * SAMPLE_RATE as usize / from as usize;
    Ok(out.into_iter().skip(delay).take(want).collect())
}

/// f32 samples in [-1, 1] to i16 with clipping.
pub fn to_i16(pcm: &[f32]) -> Vec<i16> {
    pcm.iter().map(|s| (s.clamp(-1.0, 1.0) * 32767.0) as i16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_keeps_duration_and_tone() {
        let tone: Vec<i16> = (0..22_050).map(|i| ((i as f32 * 440.0 * std::f32::consts::TAU / 22_050.0).sin() * 10_000.0) as i16).collect();
        let out = to_16k(&tone, 22_050).unwrap();
        assert_eq!(out.len(), 16_000);
        // Zero crossings of a 440 Hz tone over one second: ~880.
        let crossings = out.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
        assert!((870..=890).contains(&crossings), "{crossings}");
        // Speech starts at once: no leading silence from the filter delay.
        assert!(out[20..60].iter().any(|s| s.abs() > 1000));
    }
}
