//! `voxgate-loadtest`: see `--help`, and the README's "Load testing".

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use voxgate_loadtest::{run, Options};

#[tokio::main]
async fn main() -> ExitCode {
    let options = Options::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let interrupt = CancellationToken::new();
    let on_ctrl_c = interrupt.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("voxgate-loadtest: interrupted; hanging up every call");
            on_ctrl_c.cancel();
        }
    });
    let report = match run(&options, interrupt).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("voxgate-loadtest: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = report.write(&options.out) {
        eprintln!("voxgate-loadtest: writing the report: {e:#}");
        return ExitCode::FAILURE;
    }
    println!("{}", report.markdown());
    eprintln!("voxgate-loadtest: report in {}", options.out.display());
    ExitCode::SUCCESS
}
