//! Helpers shared by the engine's tests: the installed models and caller
//! speech made with espeak-ng (resampled to 16 kHz by sox).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use voxgate_agents::ModelPaths;

/// The models directory `scripts/setup` fills (workspace `models/`), or
/// `VOXGATE_MODELS_DIR`.
pub fn models() -> ModelPaths {
    let dir = std::env::var("VOXGATE_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"));
    let paths = ModelPaths::new(dir);
    let missing = paths.missing();
    assert!(missing.is_empty(), "models missing: {missing:?}; run scripts/setup");
    paths
}

/// `text` spoken by espeak-ng as 16 kHz mono samples in [-1, 1].
pub fn speak(text: &str) -> Vec<f32> {
    speak_with(text, "en-us", 160)
}

pub fn speak_with(text: &str, voice: &str, words_per_minute: u32) -> Vec<f32> {
    let cmd = format!(
        "espeak-ng -v {voice} -s {words_per_minute} --stdout \"$0\" | sox -t wav - -t raw -r 16000 -c 1 -b 16 -e signed-integer -",
    );
    let out = Command::new("sh").arg("-c").arg(cmd).arg(text).output().expect("espeak-ng and sox are installed by scripts/setup");
    assert!(out.status.success(), "espeak-ng/sox failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect()
}

/// Word error rate of `hyp` against `reference`, ignoring case and
/// punctuation (Levenshtein distance over words / reference words).
pub fn wer(reference: &str, hyp: &str) -> f64 {
    let norm = |s: &str| -> Vec<String> {
        s.split_whitespace()
            .map(|w| w.chars().filter(|c| c.is_alphanumeric() || *c == '\'').collect::<String>().to_lowercase())
            .filter(|w| !w.is_empty())
            .collect()
    };
    let (r, h) = (norm(reference), norm(hyp));
    let mut prev: Vec<usize> = (0..=h.len()).collect();
    for i in 1..=r.len() {
        let mut cur = vec![i; h.len() + 1];
        for j in 1..=h.len() {
            let sub = prev[j - 1] + usize::from(r[i - 1] != h[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        prev = cur;
    }
    prev[h.len()] as f64 / r.len().max(1) as f64
}
