//! Whisper tiny.en stored with f16 matrices or with Q8_0 ones: the decode
//! time and the words heard, for the same questions, spoken by espeak-ng at
//! 16 kHz and through the telephone band (8 kHz µ-law, as a call carries
//! them). Both files are converted from the installed CTranslate2 model into
//! a temporary directory. Prints one line per question, weights and threads.
//!
//!     cargo run --release -p voxgate-agents --example whisper_weights -- [reps]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use voxgate_agents::asr::Asr;
use voxgate_agents::prepare::whisper::{convert, Weights};
use voxgate_agents::ModelPaths;

const QUESTIONS: &[&str] = &[
    "What are your opening hours?",
    "Can I book an appointment for Tuesday?",
    "Do you take new patients?",
    "Hello, I would like to book a table for four people on Saturday evening.",
];

/// 16 kHz PCM of `text`, with the 100 ms of silence a pause's decode hears.
fn speak(text: &str, phone: bool) -> Vec<f32> {
    let cmd = if phone {
        "espeak-ng -v en-us -s 175 --stdout \"$0\" | sox -t wav - -r 8000 -e u-law -t wav - | sox -t wav - -t raw -r 16000 -c 1 -b 16 -e signed-integer -"
    } else {
        "espeak-ng -v en-us -s 160 --stdout \"$0\" | sox -t wav - -t raw -r 16000 -c 1 -b 16 -e signed-integer -"
    };
    let out = Command::new("sh").arg("-c").arg(cmd).arg(text).output().expect("espeak-ng and sox");
    let mut pcm: Vec<f32> = out.stdout.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect();
    pcm.extend(std::iter::repeat_n(0.0, 1_600));
    pcm
}

fn main() {
    let reps: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(7).max(1);
    let paths = ModelPaths::new("models");
    let dir = tempfile::tempdir().expect("temporary directory");
    let files: Vec<(&str, std::path::PathBuf)> = [("f16", Weights::F16), ("Q8_0", Weights::Q8_0)]
        .into_iter()
        .map(|(name, weights)| {
            let out = dir.path().join(format!("{name}.bin"));
            convert(&paths.dir.join("asr/tiny.en-ct2"), &out, weights).expect("CTranslate2 model (scripts/setup)");
            (name, out)
        })
        .collect();
    let audio: Vec<(bool, Vec<f32>)> = [false, true].into_iter().flat_map(|phone| QUESTIONS.iter().map(move |q| (phone, speak(q, phone)))).collect();
    println!("| threads | weights | band | audio | median decode | fastest | heard |");
    println!("|---|---|---|---|---|---|---|");
    for threads in [2, 1] {
        for (name, file) in &files {
            let asr = Asr::load(Path::new(file), threads).expect("converted model");
            asr.transcribe(&audio[0].1, "en").expect("warm-up decode");
            for (phone, pcm) in &audio {
                let mut times = Vec::with_capacity(reps);
                let mut heard = String::new();
                for _ in 0..reps {
                    let started = Instant::now();
                    heard = asr.transcribe(pcm, "en").expect("decode");
                    times.push(started.elapsed().as_secs_f64() * 1000.0);
                }
                times.sort_by(f64::total_cmp);
                let band = if *phone { "phone" } else { "16 kHz" };
                let secs = pcm.len() as f64 / 16_000.0;
                println!("| {threads} | {name} | {band} | {secs:.1} s | {:.0} ms | {:.0} ms | {heard} |", times[reps / 2], times[0]);
            }
        }
    }
}
