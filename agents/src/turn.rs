//! Turn-taking: when the caller starts and stops talking, as decided from
//! VAD probabilities and the partial transcript, and which short utterances
//! are backchannels that must not interrupt the agent.

use serde::{Deserialize, Serialize};

/// Tuning of one agent's turn-taking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// Silence that ends the caller's turn.
    pub end_silence_ms: u32,
    /// Silence that ends it early when the partial transcript already ends
    /// a sentence ("...opening hours?").
    pub early_end_silence_ms: u32,
    /// A pause this long gets a partial transcript at once, whatever the
    /// 400 ms step (the reply is speculated on it, and it is the final
    /// transcript if the caller does not go on). The decode hears the
    /// pause as the audio after the last word, up to 100 ms of it.
    pub pause_ms: u32,
    /// Speech probability above which a VAD window counts as speech.
    pub threshold: f32,
    /// Caller speech longer than this while the agent speaks is a barge-in
    /// whatever it says.
    pub backchannel_max_ms: u32,
    /// Audio kept from before the detected onset (the VAD is late by a
    /// window or two and the first phoneme matters to ASR).
    pub preroll_ms: u32,
    /// Start the reply on the partial transcript of a pause, before the
    /// turn is decided; it is heard only if the turn ends on those words.
    /// Costs wasted LLM work (tokens, with a paid remote model) whenever the
    /// caller goes on after a pause.
    pub speculate: bool,
    /// Words in the first piece of a reply that has no comma early on (it
    /// may grow by two to avoid ending on "the", "of"...). The caller hears
    /// nothing until that piece is written and synthesized; fewer words
    /// answer sooner, but the rest of the sentence must then be ready by the
    /// time those few words have played. 2 answered ~120 ms sooner than 4
    /// at p50 with no longer gaps inside the reply (docs/BENCHMARKS.md).
    pub first_piece_words: u32,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            end_silence_ms: 500,
            early_end_silence_ms: 240,
            pause_ms: 100,
            threshold: 0.5,
            backchannel_max_ms: 600,
            preroll_ms: 200,
            speculate: true,
            first_piece_words: 2,
        }
    }
}

impl TurnConfig {
    /// Checks the bounds, naming the field that breaks one.
    pub fn validate(&self) -> Result<(), String> {
        let within = |name: &str, ms: u32, min: u32, max: u32| {
            if ms < min || ms > max {
                Err(format!("{name} must be {min}-{max} ms (got {ms})"))
            } else {
                Ok(())
            }
        };
        within("end_silence_ms", self.end_silence_ms, 100, 5_000)?;
        within("early_end_silence_ms", self.early_end_silence_ms, 40, self.end_silence_ms)?;
        within("pause_ms", self.pause_ms, 40, self.early_end_silence_ms)?;
        within("backchannel_max_ms", self.backchannel_max_ms, 0, 5_000)?;
        within("preroll_ms", self.preroll_ms, 0, 1_000)?;
        if !(2..=8).contains(&self.first_piece_words) {
            return Err(format!("first_piece_words must be 2-8 (got {})", self.first_piece_words));
        }
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return Err(format!("threshold must be between 0 and 1 (got {})", self.threshold));
        }
        Ok(())
    }
}

/// Words that acknowledge without taking the turn.
const BACKCHANNEL_WORDS: &[&str] = &[
    "uh", "huh", "uh-huh", "uhhuh", "mm", "mhm", "mm-hmm", "hmm", "hm", "yeah", "yep", "yes", "ok", "okay", "right", "sure", "ah", "oh", "aha", "i", "see",
    "um", "so", "alright",
];

/// Below this mean token probability a short utterance's transcript is
/// Whisper guessing words into a hum or a breath (measured on espeak
/// "uh-huh"/"mm-hmm": 0.45-0.54; clear short words: 0.65-0.9).
pub const MIN_CONFIDENCE: f32 = 0.6;

/// True when a short utterance over the agent is an acknowledgement, not a
/// new turn: no content word, or nothing Whisper is sure are words.
pub fn is_backchannel(text: &str, confidence: f32) -> bool {
    confidence < MIN_CONFIDENCE || only_backchannel_words(text)
}

fn only_backchannel_words(text: &str) -> bool {
    let words: Vec<String> = text
        .split_whitespace()
        .map(|w| w.chars().filter(|c| c.is_alphanumeric() || *c == '-').collect::<String>().to_lowercase())
        .filter(|w| !w.is_empty())
        .collect();
    words.len() <= 3 && words.iter().all(|w| BACKCHANNEL_WORDS.contains(&w.as_str()))
}

/// True when a partial transcript ends a sentence, so the turn may end
/// before the full silence timeout.
pub fn ends_sentence(text: &str) -> bool {
    let t = text.trim_end();
    t.split_whitespace().count() >= 2 && (t.ends_with('?') || t.ends_with('.') || t.ends_with('!'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backchannels_have_no_content_words() {
        for t in ["Uh-huh.", "yeah", "Mm-hmm", "Okay.", "Yes, right.", ""] {
            assert!(is_backchannel(t, 0.9), "{t}");
        }
        for t in ["Wait, stop.", "What time do you close?", "yeah but no", "Cancel it"] {
            assert!(!is_backchannel(t, 0.9), "{t}");
        }
        assert!(is_backchannel("And then then.", 0.45));
    }

    #[test]
    fn a_config_out_of_bounds_names_the_field() {
        assert_eq!(TurnConfig::default().validate(), Ok(()));
        let bad = |f: fn(&mut TurnConfig)| {
            let mut c = TurnConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(bad(|c| c.pause_ms = 20), "pause_ms must be 40-240 ms (got 20)");
        assert_eq!(bad(|c| c.pause_ms = 300), "pause_ms must be 40-240 ms (got 300)");
        assert_eq!(bad(|c| c.early_end_silence_ms = 600), "early_end_silence_ms must be 40-500 ms (got 600)");
        assert_eq!(bad(|c| c.end_silence_ms = 50), "end_silence_ms must be 100-5000 ms (got 50)");
        assert_eq!(bad(|c| c.first_piece_words = 1), "first_piece_words must be 2-8 (got 1)");
        assert_eq!(bad(|c| c.threshold = 1.0), "threshold must be between 0 and 1 (got 1)");
        assert_eq!(bad(|c| c.threshold = f32::NAN), "threshold must be between 0 and 1 (got NaN)");
    }

    #[test]
    fn sentence_ends_need_two_words() {
        assert!(ends_sentence("What are your opening hours?"));
        assert!(!ends_sentence("Hello."));
        assert!(!ends_sentence("I would like"));
    }
}
