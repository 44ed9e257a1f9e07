//! Turn latency of the conversation engine on this machine: one session,
//! N caller turns (espeak-ng questions, paced at the wire's 20 ms), and the
//! per-stage times each turn reports, as percentiles.
//!
//!     cargo run -p voxgate-agents --example turn_latency -- 30

use std::process::Command;
use std::time::{Duration, Instant};

use voxgate_agents::{AgentConfig, AgentEvent, Engines, EnginesConfig, Session, Speaker, TurnMetrics, FRAME};

const QUESTIONS: &[&str] = &["What are your opening hours?", "Do you have a table for two tonight?", "Can I bring my dog?", "Where are you located?", "Thank you very much."];

fn speak(text: &str) -> Vec<i16> {
    let cmd = "espeak-ng -v en-us -s 160 --stdout \"$0\" | sox -t wav - -t raw -r 16000 -c 1 -b 16 -e signed-integer -";
    let out = Command::new("sh").arg("-c").arg(cmd).arg(text).output().expect("espeak-ng and sox");
    out.stdout.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect()
}

fn pct(v: &mut [u32], p: f64) -> u32 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let turns: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(30);
    // Each turn waits for the whole reply to be played at the wire's pace:
    // budget about 20 s a turn.
    let engines = Engines::load(EnginesConfig::default()).expect("models installed (scripts/setup)");
    let config = AgentConfig {
        system_prompt: "You are the receptionist of Luigi's restaurant, open every day from nine to ten. Answer in one short sentence.".into(),
        ..AgentConfig::default()
    };
    let (session, mut events) = Session::start(engines, config).unwrap();
    session.answered().await;
    let audio: Vec<Vec<i16>> = QUESTIONS.iter().map(|q| speak(q)).collect();
    let mut metrics: Vec<TurnMetrics> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for t in 0..turns {
        let utterance = &audio[t % audio.len()];
        let silence = vec![0i16; FRAME];
        let mut frames = utterance.chunks(FRAME).map(|c| c.to_vec()).collect::<Vec<_>>().into_iter();
        let mut done = false;
        let mut waited = 0;
        while !done && waited < 1500 {
            tick.tick().await;
            let mut f = frames.next().unwrap_or_else(|| silence.clone());
            f.resize(FRAME, 0);
            session.push_audio(f, Instant::now()).await;
            waited += 1;
            while let Ok(e) = events.try_recv() {
                match e {
                    AgentEvent::TurnMetrics(m) => metrics.push(m),
                    AgentEvent::Transcript(tr) if tr.is_final => {
                        eprintln!("  {:?}{}: {}", tr.speaker, if tr.interrupted { " (cut)" } else { "" }, tr.text);
                        done |= tr.speaker == Speaker::Agent;
                    }
                    _ => {}
                }
            }
        }
        eprintln!("turn {}/{turns}: {:?}", t + 1, metrics.last());
    }
    let col = |f: fn(&TurnMetrics) -> u32| metrics.iter().map(f).collect::<Vec<u32>>();
    println!("turns measured: {}", metrics.len());
    println!("| stage | p50 ms | p95 ms |\n|---|---|---|");
    for (name, mut v) in [
        ("endpoint (end of speech -> turn decided)", col(|m| m.endpoint_ms)),
        ("ASR final (0 = partial reused)", col(|m| m.asr_ms)),
        ("end of speech -> reply started", col(|m| m.reply_start_ms)),
        ("LLM first token", col(|m| m.llm_first_token_ms)),
        ("LLM first piece's text", col(|m| m.llm_first_piece_ms)),
        ("TTS first audio", col(|m| m.tts_first_audio_ms)),
        ("end of speech -> first agent frame", col(|m| m.voice_to_voice_ms)),
    ] {
        if !v.is_empty() {
            println!("| {name} | {} | {} |", pct(&mut v, 0.5), pct(&mut v, 0.95));
        }
    }
}
