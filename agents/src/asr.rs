//! Speech recognition with whisper.cpp (through `whisper-rs`). One context
//! (the weights) per process, one state per decode: states are cheap next to
//! the weights, and a fresh state keeps concurrent calls independent.
//!
//! Decodes share a budget of threads (`asr_threads`, default the pool's
//! size): a decode takes the free threads it is allowed when it starts, one
//! that finds none free waits for a decode to end, and together they never
//! use more, because more ggml threads than cores livelock on its spinning
//! barriers. The caller says how many it may take: one for its pool slot
//! and one for each other slot it found free and holds while it decodes (a
//! turn's transcript comes ~1.7x sooner on two cores than on one), and only
//! one next to LLM or TTS work, since a decode on two threads next to them
//! spins on its barriers and takes many times longer.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use whisper_rs::{FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters, WhisperState};

use crate::error::AgentError;

/// Whisper's audio context is 1500 frames for 30 s; whisper.cpp may run the
/// encoder on a shorter window, which is most of the speed-up on short
/// utterances (the quality holds when the window covers the audio plus a
/// margin).
const FRAMES_PER_SECOND: f32 = 50.0;
const MAX_AUDIO_CTX: i32 = 1500;

/// Decoder states kept for reuse at most: one per decode that runs at once
/// on a busy pool, more would only hold memory.
const IDLE_STATES: usize = 4;

/// A loaded Whisper model.
pub struct Asr {
    ctx: WhisperContext,
    /// Threads decodes may use in all.
    budget: usize,
    threads: Threads,
    /// States of finished decodes: whisper.cpp allocates a state's buffers
    /// and plans its graphs when it is made (4-12 ms for tiny.en on this
    /// machine's CPU), and a state may decode again (each decode clears it).
    idle: Mutex<Vec<WhisperState>>,
}

/// The threads decodes may still take.
struct Threads {
    free: Mutex<usize>,
    freed: Condvar,
}

/// Threads a decode holds, given back when it ends (also on a panic).
struct Held<'a> {
    threads: &'a Threads,
    n: usize,
}

impl Threads {
    /// No thread is free: a decode started now would wait.
    fn all_taken(&self) -> bool {
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) == 0
    }

    /// Every free thread up to `max`, at least one (waiting for one if none
    /// is free).
    fn take(&self, max: usize) -> Held<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        let n = (*free).min(max.max(1));
        *free -= n;
        Held { threads: self, n }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        *self.threads.free.lock().unwrap_or_else(|p| p.into_inner()) += self.n;
        self.threads.freed.notify_all();
    }
}

impl Asr {
    /// Loads the ggml model at `path`; decodes use at most `threads`
    /// threads in all.
    pub fn load(path: &Path, threads: usize) -> Result<Self, AgentError> {
        let path_str = path.to_str().ok_or_else(|| AgentError::Model("whisper path is not UTF-8".into()))?;
        if !path.is_file() {
            return Err(AgentError::Model(format!("whisper model {path_str} not found (run scripts/setup)")));
        }
        let ctx = WhisperContext::new_with_params(path_str, WhisperContextParameters::default())
            .map_err(|e| AgentError::Model(format!("whisper: {e}")))?;
        let budget = threads.max(1);
        Ok(Asr { ctx, budget, threads: Threads { free: Mutex::new(budget), freed: Condvar::new() }, idle: Mutex::new(Vec::new()) })
    }

    /// Threads decodes may use in all (`asr_threads`).
    pub fn threads(&self) -> usize {
        self.budget
    }

    /// Every thread is taken by a decode: optional work (a partial
    /// transcript) is better skipped than queued behind it.
    pub fn busy(&self) -> bool {
        self.threads.all_taken()
    }

    /// Transcribes 16 kHz mono PCM in [-1, 1]. Blocking: call it from the
    /// inference pool.
    pub fn transcribe(&self, pcm: &[f32], language: &str) -> Result<String, AgentError> {
        self.transcribe_scored(pcm, language, usize::MAX, None).map(|(text, _)| text)
    }

    /// Like [`Asr::transcribe`], with the mean probability of the text
    /// tokens: low on fragments that Whisper makes words of ("uh-huh" heard
    /// as "and then then"), high on clear speech. The decode uses at most
    /// `threads` of the free ones. Setting `abort` stops it early with an
    /// error: a partial transcript that newer audio made useless gives its
    /// thread back.
    pub fn transcribe_scored(&self, pcm: &[f32], language: &str, threads: usize, abort: Option<Arc<AtomicBool>>) -> Result<(String, f32), AgentError> {
        let err = |e: whisper_rs::WhisperError| AgentError::Inference(format!("whisper: {e}"));
        let started = std::time::Instant::now();
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut state = match idle {
            Some(state) => state,
            None => self.ctx.create_state().map_err(err)?,
        };
        let mut params = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
        let threads = self.threads.take(threads);
        let n_threads = threads.n;
        params.set_n_threads(n_threads as i32);
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
        // No temperature fallback: a retry costs a full decode and a phone
        // turn cannot wait for it. Speech runs at most ~5 tokens a second;
        // the bound stops a hallucination loop on noise early.
        params.set_temperature_inc(0.0);
        params.set_max_tokens(max_tokens_for(pcm.len()));
        // whisper-rs's closure-taking setter reads its boxed closure as the
        // wrong type (0.16: every decode aborts at once), so the flag is
        // handed to whisper.cpp directly.
        if let Some(flag) = &abort {
            // SAFETY: `aborted` only reads the AtomicBool behind the
            // pointer, and `abort` keeps it alive until this function
            // returns, after `full` is done with `params`.
            unsafe {
                params.set_abort_callback(Some(aborted));
                params.set_abort_callback_user_data(Arc::as_ptr(flag) as *mut std::ffi::c_void);
            }
        }
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
        drop(threads);
        let mut text = String::new();
        let (mut p_sum, mut p_n) = (0.0f32, 0u32);
        let eot = self.ctx.token_eot();
        for seg in state.as_iter() {
            text.push_str(&seg.to_str_lossy().map_err(err)?);
            for i in 0..seg.n_tokens() {
                if let Some(tok) = seg.get_token(i).filter(|t| t.token_id() < eot) {
                    p_sum += tok.token_probability();
                    p_n += 1;
                }
            }
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_STATES {
            idle.push(state);
        }
        drop(idle);
        let confidence = if p_n == 0 { 0.0 } else { p_sum / p_n as f32 };
        let text = collapse_repeats(&clean(&text));
        tracing::debug!(samples = pcm.len(), threads = n_threads, elapsed_ms = started.elapsed().as_millis() as u64, confidence, text = %text, "transcribed");
        Ok((text, confidence))
    }
}

/// whisper.cpp's abort callback: the user data is an `AtomicBool`.
unsafe extern "C" fn aborted(flag: *mut std::ffi::c_void) -> bool {
    // SAFETY: set up by `transcribe_scored`, which keeps the flag alive.
    unsafe { (*(flag as *const AtomicBool)).load(Ordering::Relaxed) }
}

/// Encoder window for `samples` of 16 kHz audio: the audio plus a margin of
/// 0.3 s, rounded up to a multiple of 32 frames, never above 30 s. A window
/// much longer than the audio invites the decoder to fill the silence by
/// repeating itself.
pub fn audio_ctx_for(samples: usize) -> i32 {
    let seconds = samples as f32 / 16_000.0 + 0.3;
    let frames = (seconds * FRAMES_PER_SECOND).ceil() as i32;
    (((frames + 31) / 32) * 32).clamp(64, MAX_AUDIO_CTX)
}

/// Token budget for `samples` of audio: fast speech is about 4 tokens a
/// second, so 6 per second plus a margin never cuts real speech.
pub fn max_tokens_for(samples: usize) -> i32 {
    (samples as f32 / 16_000.0 * 6.0).ceil() as i32 + 8
}

/// "Hours? Hours? Hours?" -> "Hours?": drops a sentence that repeats the one
/// before it, the decoder's typical failure on a short window.
fn collapse_repeats(text: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if matches!(c, '.' | '?' | '!') {
            let sentence = text[start..=i].trim();
            if !sentence.is_empty() && out.last() != Some(&sentence) {
                out.push(sentence);
            }
            start = i + 1;
        }
    }
    let rest = text[start..].trim();
    // A cut-off repetition at the end ("What are") is dropped too.
    if !rest.is_empty() && !out.last().is_some_and(|last| last.starts_with(rest)) {
        out.push(rest);
    }
    collapse_phrase_loops(&out.join(" "))
}

/// Longest phrase, in words, whose back-to-back repetition is collapsed.
const MAX_LOOP_WORDS: usize = 8;

/// "open open open" -> "open", "where are you located where are you
/// located where are" -> "where are you located": a short window makes the
/// decoder loop on its last words until the token budget, and without
/// punctuation the sentence pass above cannot see it. Speech that truly
/// doubles a word ("had had") is rarer than the echo.
fn collapse_phrase_loops(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    // Compared without case and punctuation, each word normalized once.
    let bare: Vec<String> = words.iter().map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase()).collect();
    // Indices into `words` of the words kept.
    let mut kept: Vec<usize> = Vec::new();
    // The length of the phrase whose repeat was last dropped: the loop.
    let mut looping: Option<usize> = None;
    let mut i = 0;
    'words: while i < words.len() {
        for n in 1..=MAX_LOOP_WORDS.min(kept.len()) {
            let phrase = &kept[kept.len() - n..];
            let repeats = |at: usize, m: usize| at + m <= words.len() && (0..m).all(|k| !bare[phrase[k]].is_empty() && bare[phrase[k]] == bare[at + k]);
            // A word said twice is an echo; a phrase said twice may be
            // speech ("for two, for two people"), three times is a loop.
            // Once looping, the end of the text may cut the phrase off.
            let m = if looping == Some(n) { n.min(words.len() - i) } else { n };
            if repeats(i, m) && (n == 1 || looping == Some(n) || repeats(i + n, n)) {
                looping = Some(n);
                i += m;
                continue 'words;
            }
        }
        kept.push(i);
        looping = None;
        i += 1;
    }
    kept.iter().map(|&i| words[i]).collect::<Vec<_>>().join(" ")
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
    fn a_decode_alone_takes_every_thread_and_others_wait_for_one() {
        let threads = std::sync::Arc::new(Threads { free: Mutex::new(2), freed: Condvar::new() });
        let first = threads.take(usize::MAX);
        assert_eq!(first.n, 2);
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = {
            let threads = threads.clone();
            std::thread::spawn(move || tx.send(threads.take(usize::MAX).n).unwrap())
        };
        // The budget never goes over: the second decode waits.
        assert!(rx.recv_timeout(std::time::Duration::from_millis(100)).is_err());
        drop(first);
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(), 2);
        waiting.join().unwrap();
        assert_eq!(*threads.free.lock().unwrap(), 2);
    }

    #[test]
    fn a_decode_next_to_other_work_takes_one_thread_and_leaves_the_rest() {
        let threads = Threads { free: Mutex::new(2), freed: Condvar::new() };
        let one = threads.take(1);
        assert_eq!(one.n, 1);
        assert!(!threads.all_taken());
        let other = threads.take(usize::MAX);
        assert_eq!(other.n, 1);
        assert!(threads.all_taken());
        drop((one, other));
        assert_eq!(*threads.free.lock().unwrap(), 2);
    }

    #[test]
    fn audio_ctx_grows_with_audio_and_is_capped() {
        assert_eq!(audio_ctx_for(0), 64);
        assert_eq!(audio_ctx_for(16_000 * 3), 192);
        assert_eq!(audio_ctx_for(16_000 * 40), MAX_AUDIO_CTX);
    }

    #[test]
    fn repeated_sentences_collapse() {
        assert_eq!(collapse_repeats("What are your hours? What are your hours? What are"), "What are your hours?");
        assert_eq!(collapse_repeats("No No"), "No");
        assert_eq!(collapse_repeats("Yes. No. Yes."), "Yes. No. Yes.");
        assert_eq!(collapse_repeats("no punctuation"), "no punctuation");
        assert_eq!(collapse_repeats("What are your open open open open"), "What are your open");
        assert_eq!(collapse_repeats("where are you located where are you located where are you located where are"), "where are you located");
        assert_eq!(collapse_repeats("Yes, I think so. I think I think we can"), "Yes, I think so. I think I think we can");
        assert_eq!(collapse_repeats("A table for two, for two people"), "A table for two, for two people");
    }

    #[test]
    fn annotations_are_removed() {
        assert_eq!(clean(" [BLANK_AUDIO] Hello (music) there. "), "Hello there.");
    }
}
