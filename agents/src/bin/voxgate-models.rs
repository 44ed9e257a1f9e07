//! `voxgate-models prepare [DIR]`: the conversions `scripts/setup` runs once
//! after `scripts/models` has installed the registry packages into DIR
//! (default `models`). Each step is skipped when its output already exists.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use voxgate_agents::prepare;
use voxgate_agents::ModelPaths;

fn step(what: &str, out: &Path, run: impl FnOnce() -> Result<(), voxgate_agents::AgentError>) -> Result<(), String> {
    if out.exists() {
        return Ok(());
    }
    let started = Instant::now();
    eprintln!("models: {what} ...");
    run().map_err(|e| format!("{what}: {e}"))?;
    eprintln!("models: {what}: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn prepare_all(dir: &Path) -> Result<(), String> {
    let paths = ModelPaths::new(dir);
    let ct2 = dir.join("asr/tiny.en-ct2");
    step("Whisper tiny.en: CTranslate2 -> ggml", &paths.whisper, || prepare::whisper::convert(&ct2, &paths.whisper, prepare::whisper::Weights::F16))?;
    let q4 = dir.join("llm/SmolLM2-135M-Instruct.Q4_1.gguf");
    step("SmolLM2-135M-Instruct: Q4_1 -> Q8_0", &paths.llm, || prepare::gguf::requantize_q8_0(&q4, &paths.llm))?;
    let missing = paths.missing();
    if !missing.is_empty() {
        return Err(format!("missing after preparation: {} (run scripts/models)", missing.join(", ")));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = match args.as_slice() {
        [cmd] if cmd == "prepare" => PathBuf::from("models"),
        [cmd, dir] if cmd == "prepare" => PathBuf::from(dir),
        _ => {
            eprintln!("usage: voxgate-models prepare [MODELS_DIR]");
            return ExitCode::from(2);
        }
    };
    match prepare_all(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("models: {e}");
            ExitCode::FAILURE
        }
    }
}
