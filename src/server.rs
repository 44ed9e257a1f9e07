//! Starting and stopping the server: build `AppState`, start the background
//! tasks it owns, serve HTTP, and on SIGINT/SIGTERM stop taking requests,
//! finish the ones in flight and stop every task.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::usage_recorder::KeyUsageRecorder;
use crate::config::Config;
use crate::db::Db;
use crate::limits::RequestLimiter;
use crate::metrics::Metrics;
use crate::net::ssrf::SsrfGuard;
use crate::state::AppState;

/// Runs the server until a shutdown signal.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let db = Db::open(&config.database_url, config.db_max_connections).await?;
    let shutdown = CancellationToken::new();
    let (key_usage, key_usage_task) = KeyUsageRecorder::start(db.clone(), shutdown.clone());
    let state = AppState {
        db: db.clone(),
        limiter: Arc::new(RequestLimiter::new(&config.rate_limits)),
        metrics: Arc::new(Metrics::new().context("metrics registry")?),
        ssrf: SsrfGuard::system(),
        key_usage,
        config: Arc::new(config),
    };
    let limiter_task = tokio::spawn(forget_idle_limits(state.limiter.clone(), shutdown.clone()));

    let listener = TcpListener::bind(state.config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", state.config.bind))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, node_id = %state.config.node_id, backend = ?db.backend, "voxgate listening");
    // Scripts and tests read this line to learn the port.
    println!("voxgate listening on http://{addr}");
    if crate::accounts::list(&db).await?.is_empty() {
        println!(
            "No accounts yet. Create one and its first key with:\n  voxgate accounts create --name \"My company\" --plan enterprise --credits 10000\n  voxgate keys create --account <account id>"
        );
    }
    let _ = std::io::stdout().flush();

    let app = crate::api::router(state);
    let signal = shutdown_signal(shutdown.clone());
    axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(signal)
        .await
        .context("HTTP server failed")?;

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = key_usage_task.await;
        let _ = limiter_task.await;
    })
    .await;
    db.pool.close().await;
    tracing::info!("voxgate stopped");
    Ok(())
}

async fn forget_idle_limits(limiter: Arc<RequestLimiter>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => limiter.forget_idle(),
        }
    }
}

/// Resolves on SIGINT or SIGTERM (or when `shutdown` is cancelled).
async fn shutdown_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
        _ = shutdown.cancelled() => {},
    }
    tracing::info!("shutdown signal received, finishing requests in flight");
}
