//! Speed of each stage of the conversation engine alone, on this machine,
//! with nothing else running: Whisper's real-time factor, the local LLM's
//! time to first token and tokens per second as a call's history grows,
//! Piper's time to first audio and real-time factor. One thread or two for
//! the stages that can use both cores. Prints Markdown tables.
//!
//!     cargo run -p voxgate-agents --example stage_speed -- [reps]
//!
//! (The dev profile builds whisper.cpp, candle and ONNX Runtime's callers
//! at opt-level 3, so it measures what a release build runs.)

use std::process::Command;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use voxgate_agents::asr::Asr;
use voxgate_agents::llm::{ChatMessage, Generation, LocalLlm};
use voxgate_agents::tts::Piper;
use voxgate_agents::{ModelPaths, Role};

const UTTERANCES: &[&str] = &[
    "What are your opening hours?",
    "Do you have a table for two tonight?",
    "Hello, I would like to book a table for four people on Saturday evening, around eight if you can, near the window.",
];
const QUESTIONS: &[&str] = &["What are your opening hours?", "Do you have a table for two tonight?", "Can I bring my dog?", "Where are you located?", "Thank you very much."];
const SYSTEM: &str = "You are the receptionist of Luigi's restaurant, open every day from nine to ten. Answer in one short sentence.";
const PIECES: &[&str] = &["We're happy to assist you,", "We are open every day from nine in the morning to ten at night."];

fn espeak_pcm(text: &str) -> Vec<f32> {
    let cmd = "espeak-ng -v en-us -s 160 --stdout \"$0\" | sox -t wav - -t raw -r 16000 -c 1 -b 16 -e signed-integer -";
    let out = Command::new("sh").arg("-c").arg(cmd).arg(text).output().expect("espeak-ng and sox");
    out.stdout.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed())
}

fn asr(paths: &ModelPaths, reps: usize) {
    println!("\n### ASR: Whisper tiny.en (median of {reps} decodes)\n");
    println!("| utterance | audio | threads | decode | RTF |");
    println!("|---|---|---|---|---|");
    let audio: Vec<Vec<f32>> = UTTERANCES.iter().map(|u| espeak_pcm(u)).collect();
    for threads in [1, 2] {
        let asr = Asr::load(&paths.whisper, threads).expect("whisper model (scripts/setup)");
        asr.transcribe(&audio[0], "en").expect("warm-up decode");
        for (text, pcm) in UTTERANCES.iter().zip(&audio) {
            let secs = pcm.len() as f64 / 16_000.0;
            let d = median((0..reps).map(|_| timed(|| asr.transcribe(pcm, "en").expect("decode")).1).collect());
            let short: String = text.chars().take(32).collect();
            println!("| {short}… | {secs:.2} s | {threads} | {:.0} ms | {:.3} |", ms(d), d.as_secs_f64() / secs);
        }
    }
}

fn llm(paths: &ModelPaths) {
    println!("\n### LLM: SmolLM2-135M-Instruct Q8_0, one call's turns\n");
    println!("(The products with the Q8_0 weights, a prompt's and a token's, on one thread, or two with the spare thread.)\n");
    println!("| spare thread | turn | tokens in cache before | prompt tokens read | first token | tokens | tokens/s after the first |");
    println!("|---|---|---|---|---|---|---|");
    for spare in [false, true] {
        let llm = LocalLlm::load(&paths.llm).expect("LLM model (scripts/setup)").with_spare_core(move || spare);
        let mut conv = llm.conversation(7);
        let mut messages = vec![ChatMessage::new(Role::System, SYSTEM)];
        let opts = Generation { max_tokens: 64, temperature: 0.0, top_p: 1.0 };
        let cancel = CancellationToken::new();
        let mut cached = 0;
        for (turn, q) in QUESTIONS.iter().cycle().take(8).enumerate() {
            messages.push(ChatMessage::new(Role::User, *q));
            let started = Instant::now();
            let mut g = llm.start(&mut conv, &messages, opts).expect("prompt");
            // The first token counts when its text is out, before the model
            // reads it back for the next one.
            let mut first = None;
            while !llm.step(&mut conv, &mut g, 1, &cancel, |_| {
                first.get_or_insert_with(|| started.elapsed());
            }).expect("step") {}
            let total = started.elapsed();
            let reply = g.reply();
            let first = first.unwrap_or(total);
            let rate = (reply.tokens.saturating_sub(1)) as f64 / (total - first).as_secs_f64().max(1e-9);
            let spare = if spare { "yes" } else { "no" };
            println!("| {spare} | {} | {cached} | {} | {:.0} ms | {} | {rate:.0} |", turn + 1, reply.read, ms(first), reply.tokens);
            cached += reply.read + reply.tokens;
            messages.push(ChatMessage::new(Role::Assistant, reply.text));
        }
    }
}

fn tts(paths: &ModelPaths, reps: usize) {
    println!("\n### TTS: Piper en_US-joe-medium (ONNX Runtime), whole piece (median of {reps})\n");
    println!("| piece | audio | intra-op threads | espeak-ng phonemes | synthesis (= first audio) | RTF |");
    println!("|---|---|---|---|---|---|");
    let piper = Piper::load_installed(&paths.dir, 2).expect("Piper voice and ONNX Runtime (scripts/setup)");
    for threads in [1, 2] {
        let wide = threads > 1;
        piper.synthesize(PIECES[0], 1.0, wide).expect("warm-up synthesis");
        for text in PIECES {
            let secs = piper.synthesize(text, 1.0, wide).expect("synthesis").len() as f64 / 16_000.0;
            let phon = median((0..reps).map(|_| timed(|| Command::new("espeak-ng").args(["-q", "--ipa", "-v", "en-us", "--", text]).output().expect("espeak-ng")).1).collect());
            let d = median((0..reps).map(|_| timed(|| piper.synthesize(text, 1.0, wide).expect("synthesis")).1).collect());
            println!("| {text} | {secs:.2} s | {threads} | {:.0} ms | {:.0} ms | {:.3} |", ms(phon), ms(d), d.as_secs_f64() / secs);
        }
    }
}

fn main() {
    let reps: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(5).max(1);
    let paths = ModelPaths::new("models");
    asr(&paths, reps);
    llm(&paths);
    tts(&paths, reps);
}
