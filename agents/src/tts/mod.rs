//! Speech synthesis. Local engines (Piper, espeak-ng) run on the inference
//! pool; hosted engines (ElevenLabs v3, Fish Audio S1, Kokoro behind an
//! OpenAI-style speech endpoint) are HTTP clients. Every engine returns
//! 16 kHz mono PCM, which is what the session cuts into 20 ms frames.

mod espeak;
mod hosted;
mod phonemes;
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

/// Loudness (RMS, i16 scale) under which a 10 ms window of synthesized
/// speech counts as silence: about -42 dBFS, below a voice's softest onset.
const SILENT_RMS: f32 = 260.0;
/// Silence kept before the first sound, so a soft onset is not clipped.
const LEAD_KEPT: usize = 16 * 20;
/// Silence kept after a piece that ends inside its sentence: a breath, not
/// the full stop's pause the voice leaves.
const PHRASE_PAUSE_KEPT: usize = 16 * 120;

/// A reply piece as it should be played: the engine's leading silence cut
/// (the caller waits for the first sound, not the first sample), and for
/// a piece that ends inside its sentence (`continues`) the trailing pause
/// shortened, so the phrases of one sentence run together.
pub fn trim_for_reply(pcm: Vec<i16>, continues: bool) -> Vec<i16> {
    trim(pcm, continues.then_some(PHRASE_PAUSE_KEPT))
}

/// Speech cut to its sound: the leading silence as for a reply, none
/// after the last sound (espeak-ng ends every text with ~300 ms of it; a
/// simulated caller's turn ends where its voice does).
pub fn trim_to_sound(pcm: Vec<i16>) -> Vec<i16> {
    trim(pcm, Some(0))
}

/// Cuts the leading silence to [`LEAD_KEPT`], and the trailing silence to
/// `kept_after` samples when given.
fn trim(mut pcm: Vec<i16>, kept_after: Option<usize>) -> Vec<i16> {
    const WINDOW: usize = 160;
    let windows: Vec<bool> = pcm.chunks(WINDOW).map(|w| rms(w) >= SILENT_RMS).collect();
    let Some(first) = windows.iter().position(|l| *l) else { return pcm };
    if let Some(kept) = kept_after {
        let last = windows.iter().rposition(|l| *l).unwrap_or(first);
        pcm.truncate(((last + 1) * WINDOW + kept).min(pcm.len()));
    }
    pcm.drain(..(first * WINDOW).saturating_sub(LEAD_KEPT));
    pcm
}

/// Root mean square of `pcm` on the i16 scale (0 for no samples).
pub(crate) fn rms(pcm: &[i16]) -> f32 {
    let sum: f64 = pcm.iter().map(|s| f64::from(*s) * f64::from(*s)).sum();
    (sum / pcm.len().max(1) as f64).sqrt() as f32
}

/// f32 samples in [-1, 1] to i16 with clipping.
pub fn to_i16(pcm: &[f32]) -> Vec<i16> {
    pcm.iter().map(|s| (s.clamp(-1.0, 1.0) * 32767.0) as i16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_pieces_lose_leading_silence_and_phrases_their_long_pause() {
        let tone = |ms: usize| -> Vec<i16> { (0..ms * 16).map(|i| ((i as f32 * 0.2).sin() * 3000.0) as i16).collect() };
        let quiet = |ms: usize| vec![30i16; ms * 16];
        let pcm: Vec<i16> = [quiet(100), tone(500), quiet(340)].concat();
        let sentence = trim_for_reply(pcm.clone(), false);
        assert_eq!(sentence.len(), (20 + 500 + 340) * 16, "20 ms kept before the sound, the full stop's pause after");
        assert!(sentence[..16 * 20].iter().all(|s| *s == 30) && sentence[16 * 20] != 30);
        let phrase = trim_for_reply(pcm, true);
        assert_eq!(phrase.len(), (20 + 500 + 120) * 16);
        // Silence alone is left alone.
        assert_eq!(trim_for_reply(quiet(200), true).len(), 200 * 16);
        let utterance = trim_to_sound([quiet(100), tone(500), quiet(300)].concat());
        assert_eq!(utterance.len(), (20 + 500) * 16, "nothing kept after the last sound");
    }

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
