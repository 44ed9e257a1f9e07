//! Piper voices (VITS exported to ONNX) run with ONNX Runtime through `ort`.
//! Text becomes IPA phonemes with the `espeak-ng` program (as Piper itself
//! does with the library), phonemes become ids with the voice's
//! `phoneme_id_map`, and the model returns audio at the voice's rate.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use ort::session::Session;
use ort::value::Tensor;
use serde::Deserialize;

use super::phonemes::Phonemizer;
use super::{to_16k, to_i16};
use crate::error::AgentError;

#[derive(Deserialize)]
struct VoiceConfig {
    audio: AudioConfig,
    espeak: EspeakConfig,
    inference: InferenceConfig,
    phoneme_id_map: HashMap<String, Vec<i64>>,
}

#[derive(Deserialize)]
struct AudioConfig {
    sample_rate: u32,
}

#[derive(Deserialize)]
struct EspeakConfig {
    voice: String,
}

#[derive(Deserialize)]
struct InferenceConfig {
    noise_scale: f32,
    length_scale: f32,
    noise_w: f32,
}

/// A loaded Piper voice. ONNX Runtime sessions run one inference at a time
/// (`run` takes `&mut`), so the voice keeps a few and hands out a free one.
pub struct Piper {
    sessions: Vec<Mutex<Session>>,
    /// A session on more than one thread, for a piece a caller waits for
    /// that found other pool slots free (it holds them meanwhile); its
    /// threads sleep rather than spin between operators.
    wide: Option<Mutex<Session>>,
    /// The wide session's threads; 1 without one.
    wide_threads: usize,
    phonemes: Phonemizer,
    config: VoiceConfig,
}

fn ort_err(e: ort::Error) -> AgentError {
    AgentError::Inference(format!("piper: {e}"))
}

impl Piper {
    /// The voice `scripts/setup` installed in `models_dir`, with the ONNX
    /// Runtime library found there: for a tool that speaks without the
    /// rest of the engines.
    pub fn load_installed(models_dir: &Path, wide_threads: usize) -> Result<Self, AgentError> {
        let paths = crate::models::ModelPaths::new(models_dir);
        // Checked first: `ort` panics on a library it cannot open.
        for file in [&paths.onnxruntime, &paths.piper, &paths.piper_config] {
            if !file.is_file() {
                return Err(AgentError::Unavailable(format!("{} is missing; run scripts/setup", file.display())));
            }
        }
        ort::init_from(paths.onnxruntime.display().to_string())
            .commit()
            .map_err(|e| AgentError::Unavailable(format!("ONNX Runtime ({}): {e}", paths.onnxruntime.display())))?;
        Piper::load(&paths.piper, &paths.piper_config, 1, wide_threads)
    }

    /// Loads the voice; `instances` single-threaded sessions for that many
    /// concurrent syntheses, and one on `wide_threads` threads when that is
    /// more than one.
    pub fn load(model: &Path, config: &Path, instances: usize, wide_threads: usize) -> Result<Self, AgentError> {
        let config: VoiceConfig = serde_json::from_slice(&std::fs::read(config)?).map_err(|e| AgentError::Model(format!("piper config: {e}")))?;
        let session = |threads: usize| {
            Session::builder()
                .and_then(|b| b.with_intra_threads(threads))
                .and_then(|b| b.with_intra_op_spinning(false))
                .and_then(|b| b.commit_from_file(model))
                .map(Mutex::new)
                .map_err(|e| AgentError::Model(format!("piper {}: {e}", model.display())))
        };
        let sessions = (0..instances.max(1)).map(|_| session(1)).collect::<Result<_, _>>()?;
        let wide = (wide_threads > 1).then(|| session(wide_threads)).transpose()?;
        let phonemes = Phonemizer::new(&config.espeak.voice, instances.max(1) + usize::from(wide.is_some()));
        let wide_threads = if wide.is_some() { wide_threads } else { 1 };
        Ok(Piper { sessions, wide, wide_threads, phonemes, config })
    }

    /// IPA phonemes of `text` from espeak-ng, one line per clause, with the
    /// clause punctuation (which the program drops) put back: Piper voices
    /// use it for prosody.
    fn phonemize(&self, text: &str) -> Result<String, AgentError> {
        let lines = self.phonemes.phonemize(text)?;
        let marks: Vec<char> = clause_marks(text);
        let mut phonemes = String::new();
        for (i, line) in lines.iter().enumerate() {
            phonemes.push_str(line);
            let mark = if marks.len() == lines.len() { Some(marks[i]) } else if i + 1 == lines.len() { marks.last().copied() } else { Some(',') };
            if let Some(m) = mark {
                phonemes.push(m);
            }
            phonemes.push(' ');
        }
        Ok(phonemes.trim_end().to_string())
    }

    /// Phoneme ids as Piper expects them: BOS, each phoneme followed by the
    /// pad id, EOS. Characters the voice does not know are skipped.
    fn ids(&self, phonemes: &str) -> Vec<i64> {
        let map = &self.config.phoneme_id_map;
        let get = |s: &str| map.get(s).and_then(|v| v.first().copied());
        let (bos, eos, pad) = (get("^").unwrap_or(1), get("$").unwrap_or(2), get("_").unwrap_or(0));
        let mut ids = vec![bos, pad];
        let mut buf = [0u8; 4];
        for c in phonemes.chars() {
            if let Some(id) = get(c.encode_utf8(&mut buf)) {
                ids.push(id);
                ids.push(pad);
            }
        }
        ids.push(eos);
        ids
    }

    /// Threads of the session a piece may run on when `wide`: 1 when the
    /// voice was loaded without one.
    pub fn wide_threads(&self) -> usize {
        self.wide_threads
    }

    /// Synthesizes `text` (one sentence or clause) as 16 kHz PCM. A `speed`
    /// above 1 speaks faster; `wide` runs it on every core (when the voice
    /// was loaded with that session and it is free). Blocking: run it on
    /// the inference pool.
    pub fn synthesize(&self, text: &str, speed: f32, wide: bool) -> Result<Vec<i16>, AgentError> {
        let phonemes = self.phonemize(text)?;
        let ids = self.ids(&phonemes);
        if ids.len() <= 3 {
            return Ok(Vec::new());
        }
        let inf = &self.config.inference;
        let n = ids.len();
        let input = Tensor::from_array(([1usize, n], ids)).map_err(ort_err)?;
        let lengths = Tensor::from_array(([1usize], vec![n as i64])).map_err(ort_err)?;
        let scales = Tensor::from_array(([3usize], vec![inf.noise_scale, inf.length_scale / speed.clamp(0.5, 2.0), inf.noise_w])).map_err(ort_err)?;
        let audio = {
            let mut session = self.wide.as_ref().filter(|_| wide).and_then(|w| w.try_lock().ok()).unwrap_or_else(|| self.session());
            let outputs = session.run(ort::inputs!["input" => input, "input_lengths" => lengths, "scales" => scales]).map_err(ort_err)?;
            let (_, samples) = outputs[0].try_extract_tensor::<f32>().map_err(ort_err)?;
            to_i16(samples)
        };
        to_16k(&audio, self.config.audio.sample_rate)
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        for s in &self.sessions {
            if let Ok(guard) = s.try_lock() {
                return guard;
            }
        }
        // All busy: wait for the first (the pool bounds how many wait).
        self.sessions[0].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The clause-ending punctuation of `text`, in order, as espeak-ng splits
/// clauses; a text without a final mark ends with '.'.
fn clause_marks(text: &str) -> Vec<char> {
    let mut marks = Vec::new();
    let mut pending = false;
    for c in text.chars() {
        match c {
            ',' | ';' | ':' | '.' | '!' | '?' if pending => {
                marks.push(if c == ';' || c == ':' { ',' } else { c });
                pending = false;
            }
            c if c.is_alphanumeric() => pending = true,
            _ => {}
        }
    }
    if pending {
        marks.push('.');
    }
    marks
}

#[cfg(test)]
mod tests {
    use super::clause_marks;

    #[test]
    fn clause_marks_follow_the_text() {
        assert_eq!(clause_marks("Hello there, we open at nine. What can I do?"), vec![',', '.', '?']);
        assert_eq!(clause_marks("no mark"), vec!['.']);
        assert_eq!(clause_marks("Wait... what?!"), vec!['.', '?']);
    }
}
