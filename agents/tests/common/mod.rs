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
/// punctuation and spelling small numbers out, as Whisper's English
/// normaliser does (Levenshtein distance over words / reference words).
pub fn wer(reference: &str, hyp: &str) -> f64 {
    const NUMBERS: [&str; 21] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
        "seventeen", "eighteen", "nineteen", "twenty",
    ];
    let norm = |s: &str| -> Vec<String> {
        s.split(|c: char| c.is_whitespace() || c == '-' || c == ':')
            .map(|w| w.chars().filter(|c| c.is_alphanumeric() || *c == '\'').collect::<String>().to_lowercase())
            .filter(|w| !w.is_empty() && w != "00")
            .flat_map(|w| match w.as_str() {
                "am" => vec!["a".to_string(), "m".to_string()],
                "pm" => vec!["p".to_string(), "m".to_string()],
                _ => vec![w],
            })
            .map(|w| w.parse::<usize>().ok().and_then(|n| NUMBERS.get(n)).map_or(w, |n| n.to_string()))
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use voxgate_agents::{AgentConfig, AgentEvent, Engines, EnginesConfig, Session, FRAME};

pub fn engines_with(config: EnginesConfig) -> Arc<Engines> {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_env("VG_LOG").unwrap_or_else(|_| "warn,whisper_rs=off".into())).with_test_writer().try_init();
    let paths = models();
    Engines::load(EnginesConfig { models_dir: paths.dir, ..config }).expect("engines load")
}

pub fn engines() -> Arc<Engines> {
    engines_with(EnginesConfig::default())
}

/// Plays the caller: pushes frames at the pace of the wire (one per 20 ms)
/// and records every event with the frame index it came at.
pub struct Caller {
    pub session: Session,
    events: mpsc::Receiver<AgentEvent>,
    pub log: Vec<(usize, AgentEvent)>,
    pub frames_pushed: usize,
    pace: Duration,
}

impl Caller {
    pub async fn answer(engines: Arc<Engines>, config: AgentConfig) -> Self {
        let (session, events) = Session::start(engines, config).expect("session starts");
        // Give the greeting time to be synthesized, as ringing would.
        tokio::time::sleep(Duration::from_millis(300)).await;
        session.answered().await;
        Caller { session, events, log: Vec::new(), frames_pushed: 0, pace: Duration::from_millis(20) }
    }

    pub async fn push(&mut self, pcm: &[f32]) {
        for chunk in pcm.chunks(FRAME) {
            let mut frame: Vec<i16> = chunk.iter().map(|s| (s * 32767.0) as i16).collect();
            frame.resize(FRAME, 0);
            self.session.push_audio(frame, Instant::now()).await;
            self.frames_pushed += 1;
            tokio::time::sleep(self.pace).await;
            self.drain();
        }
    }

    pub async fn silence(&mut self, ms: usize) {
        self.push(&vec![0.0; ms * 16]).await;
    }

    /// Waits up to `max` for the session's next event, sending no audio;
    /// logs it and says whether one came.
    pub async fn wait_without_audio(&mut self, max: Duration) -> bool {
        match tokio::time::timeout(max, self.events.recv()).await {
            Ok(Some(e)) => {
                self.log.push((self.frames_pushed, e));
                true
            }
            _ => false,
        }
    }

    pub fn drain(&mut self) {
        while let Ok(e) = self.events.try_recv() {
            self.log.push((self.frames_pushed, e));
        }
    }

    /// Pushes silence until `pred` holds for some logged event (or panics
    /// after `max_ms` of audio).
    pub async fn silence_until(&mut self, max_ms: usize, pred: impl Fn(&AgentEvent) -> bool) -> usize {
        for _ in 0..max_ms / 20 {
            if let Some(i) = self.log.iter().position(|(_, e)| pred(e)) {
                return i;
            }
            self.silence(20).await;
        }
        panic!("no matching event within {max_ms} ms of audio; log: {:?}", self.summary());
    }

    pub fn summary(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut audio = 0;
        for (f, e) in &self.log {
            match e {
                AgentEvent::AgentAudio(_) => audio += 1,
                other => {
                    if audio > 0 {
                        out.push(format!("{audio} audio frames"));
                        audio = 0;
                    }
                    out.push(format!("@{f} {other:?}"));
                }
            }
        }
        if audio > 0 {
            out.push(format!("{audio} audio frames"));
        }
        out
    }
}

/// WER over the words only: numbers (in digits or in words) and the am/pm
/// markers are dropped from both sides, since how a voice renders
/// "9:00 AM-12:30 PM" and how Whisper writes it back ("9am, 1230pm", "nine
/// a.m.") vary more than the words do.
pub fn word_wer(reference: &str, hyp: &str) -> f64 {
    const NUMBERS: &[&str] = &[
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
        "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty", "fifty", "hundred", "thousand",
    ];
    let words = |s: &str| -> String {
        s.split(|c: char| c.is_whitespace() || c == '-' || c == ',')
            .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
            .filter(|w| {
                let w = w.to_lowercase();
                let w = w.trim_matches(|c: char| !c.is_alphanumeric());
                !matches!(w, "am" | "pm" | "a" | "p" | "m") && !NUMBERS.contains(&w)
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    wer(&words(reference), &words(hyp))
}
