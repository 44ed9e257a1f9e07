use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = voxgate::cli::Cli::parse();
    // candle splits its matrix products over every core and spin-waits for
    // the halves; with other calls' inference on the same cores the waits
    // dominate (docs/BENCHMARKS.md, session 15: two calls at once, p95
    // 1.7 s with two threads, 1.0 s with one). The local LLM's Q8_0
    // products are voxgate's own (their threads: [agents] llm_threads);
    // what is left to candle (a prompt's attention, weights of other
    // kinds) runs on one thread unless CANDLE_NUM_THREADS says otherwise.
    // Set here, before any thread exists to read the environment, because
    // candle reads it once, on first use.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("voxgate: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(voxgate::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("voxgate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
