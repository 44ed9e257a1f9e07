//! Voice activity detection on 16 kHz audio: Silero VAD (ONNX, through
//! ONNX Runtime) when installed, `earshot` (pure Rust) otherwise.
//!
//! The model is loaded once per process; each call owns a [`VadStream`]
//! with its own recurrent state. One Silero window (32 ms) costs well under
//! a millisecond, so streams run it inline; the model keeps a few ONNX
//! sessions so that concurrent calls rarely wait for each other.

use std::path::Path;
use std::sync::Mutex;

use ort::session::Session;
use ort::value::Tensor;

use crate::error::AgentError;

/// Silero v5+ at 16 kHz: 512-sample windows, each preceded by the last 64
/// samples of the previous one.
const SILERO_WINDOW: usize = 512;
const SILERO_CONTEXT: usize = 64;
const SILERO_STATE: usize = 2 * 128;
/// earshot's fixed frame.
const EARSHOT_WINDOW: usize = 256;

pub struct SileroModel {
    sessions: Vec<Mutex<Session>>,
}

impl SileroModel {
    pub fn load(path: &Path, instances: usize) -> Result<Self, AgentError> {
        let sessions = (0..instances.max(1))
            .map(|_| {
                Session::builder()
                    .and_then(|b| b.with_intra_threads(1))
                    .and_then(|b| b.with_inter_threads(1))
                    .and_then(|b| b.commit_from_file(path))
                    .map(Mutex::new)
                    .map_err(|e| AgentError::Model(format!("silero vad {}: {e}", path.display())))
            })
            .collect::<Result<_, _>>()?;
        Ok(SileroModel { sessions })
    }

    fn infer(&self, window: &[f32], state: &mut [f32]) -> Result<f32, AgentError> {
        let err = |e: ort::Error| AgentError::Inference(format!("silero vad: {e}"));
        let input = Tensor::from_array(([1usize, window.len()], window.to_vec())).map_err(err)?;
        let st = Tensor::from_array(([2usize, 1, 128], state.to_vec())).map_err(err)?;
        let sr = Tensor::from_array(((), vec![16_000i64])).map_err(err)?;
        let mut guard = self.sessions.iter().find_map(|s| s.try_lock().ok()).unwrap_or_else(|| self.sessions[0].lock().unwrap_or_else(|p| p.into_inner()));
        let out = guard.run(ort::inputs!["input" => input, "state" => st, "sr" => sr]).map_err(err)?;
        let (_, prob) = out[0].try_extract_tensor::<f32>().map_err(err)?;
        let (_, next) = out[1].try_extract_tensor::<f32>().map_err(err)?;
        state.copy_from_slice(&next[..SILERO_STATE]);
        Ok(prob.first().copied().unwrap_or(0.0))
    }
}

enum Detector {
    Silero { model: std::sync::Arc<SileroModel>, state: Vec<f32>, context: Vec<f32> },
    Earshot(Box<earshot::Detector>),
}

/// One call's detector: push 20 ms frames, read speech probabilities.
pub struct VadStream {
    detector: Detector,
    pending: Vec<f32>,
}

impl VadStream {
    pub fn silero(model: std::sync::Arc<SileroModel>) -> Self {
        VadStream { detector: Detector::Silero { model, state: vec![0.0; SILERO_STATE], context: vec![0.0; SILERO_CONTEXT] }, pending: Vec::new() }
    }

    pub fn earshot() -> Self {
        VadStream { detector: Detector::Earshot(earshot::Detector::default_boxed()), pending: Vec::new() }
    }

    /// Feeds `pcm` (16 kHz); returns the speech probability of each window
    /// completed by it (none, one or two for a 20 ms frame).
    pub fn push(&mut self, pcm: &[i16]) -> Result<Vec<f32>, AgentError> {
        self.pending.extend(pcm.iter().map(|s| f32::from(*s) / 32768.0));
        let window = match self.detector {
            Detector::Silero { .. } => SILERO_WINDOW,
            Detector::Earshot(_) => EARSHOT_WINDOW,
        };
        let mut probs = Vec::new();
        while self.pending.len() >= window {
            let chunk: Vec<f32> = self.pending.drain(..window).collect();
            let p = match &mut self.detector {
                Detector::Silero { model, state, context } => {
                    let mut input = Vec::with_capacity(SILERO_CONTEXT + SILERO_WINDOW);
                    input.extend_from_slice(context);
                    input.extend_from_slice(&chunk);
                    context.copy_from_slice(&chunk[SILERO_WINDOW - SILERO_CONTEXT..]);
                    model.infer(&input, state)?
                }
                Detector::Earshot(d) => d.predict_f32(&chunk),
            };
            probs.push(p);
        }
        Ok(probs)
    }

    /// Milliseconds of audio each probability covers.
    pub fn window_ms(&self) -> u32 {
        match self.detector {
            Detector::Silero { .. } => 32,
            Detector::Earshot(_) => 16,
        }
    }
}
