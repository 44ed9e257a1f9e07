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
use crate::jobs::channels::Channels;
use crate::jobs::storage::Storage;
use crate::jobs::worker::Jobs;
use crate::limits::RequestLimiter;
use crate::metrics::Metrics;
use crate::net::ssrf::SsrfGuard;
use crate::state::AppState;
use crate::voice::engines::SpeechEngines;
use crate::voice::manager::{CallManager, Dependencies};
use crate::voice::streams::Streams;
use crate::webhooks::Webhooks;
use voxgate_media::streams::StreamConfig;
use voxgate_media::webrtc::WebRtcConfig;
use voxgate_sip::SipAgent;

/// Runs the server until a shutdown signal.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let db = Db::open(&config.database_url, config.db_max_connections).await?;
    let shutdown = CancellationToken::new();
    let (key_usage, key_usage_task) = KeyUsageRecorder::start(db.clone(), shutdown.clone());
    let ssrf = SsrfGuard::system()
        .with_exceptions(config.ssrf.allow_networks.clone(), config.ssrf.allow_http_in_allowed_networks);
    let engines = SpeechEngines::new(config.agents.clone());
    if config.calls.preload_models {
        engines.start_loading();
    }
    let (sip, inbound) = SipAgent::start(config.sip.clone(), shutdown.child_token())
        .await
        .with_context(|| format!("cannot start SIP on {}", config.sip.bind))?;
    tokio::spawn(refuse_inbound(inbound));
    let webhooks = Webhooks::new(db.clone());
    let webhook_task =
        tokio::spawn(crate::webhooks::sender::run(webhooks.clone(), config.webhooks.clone(), ssrf.clone(), shutdown.clone()));
    let metrics = Arc::new(Metrics::new().context("metrics registry")?);
    // Bound before the storage is opened: output and stream URLs name the real port.
    let listener = TcpListener::bind(config.bind).await.with_context(|| format!("cannot listen on {}", config.bind))?;
    let local_base = format!("http://{}", listener.local_addr()?);
    let storage = Storage::open(&config.storage, &local_base).context("job output storage")?;
    let stream_config = StreamConfig {
        connect_timeout: Duration::from_secs(config.calls.stream_connect_secs),
        media_timeout: Duration::from_secs(config.sip.media_timeout_secs),
    };
    let webrtc_config = WebRtcConfig {
        connect_timeout: stream_config.connect_timeout,
        media_timeout: stream_config.media_timeout,
        loopback_only: config.calls.webrtc_loopback_only,
        opus_complexity: config.sip.opus_complexity,
    };
    let streams = Streams::new(storage.clone(), config.public_url.as_deref().unwrap_or(&local_base), stream_config, webrtc_config);
    let deps = Dependencies {
        trunks: config.sip.trunks.iter().map(|t| t.name.clone()).collect(),
        carriers: config.carriers.clone(),
        streams,
        sip: sip.clone(),
        engines: engines.clone(),
        webhooks: webhooks.clone(),
        metrics: metrics.clone(),
    };
    crate::cluster::join(&db, &config.node_id, &config.cluster).await?;
    let (calls, writer_task) = CallManager::start(db.clone(), config.calls.clone(), config.node_id.clone(), deps).await?;
    let cluster_task =
        crate::cluster::spawn(db.clone(), config.node_id.clone(), config.cluster.clone(), calls.clone(), shutdown.clone());
    let jobs = Jobs::new(
        db.clone(),
        webhooks.clone(),
        Channels::new(config.channels.clone()),
        storage,
        engines.clone(),
        config.jobs.clone(),
        config.node_id.clone(),
    );
    let state = AppState {
        db: db.clone(),
        limiter: Arc::new(RequestLimiter::new(&config.rate_limits)),
        metrics,
        ssrf,
        key_usage,
        engines,
        calls: calls.clone(),
        webhooks,
        jobs,
        config: Arc::new(config),
    };
    let limiter_task = tokio::spawn(forget_idle_limits(state.limiter.clone(), shutdown.clone()));

    let addr = listener.local_addr()?;
    let job_task = state.jobs.start(shutdown.clone());
    tracing::info!(%addr, node_id = %state.config.node_id, backend = ?db.backend, "voxgate listening");
    // Scripts and tests read this line to learn the port.
    println!("voxgate listening on http://{addr}");
    println!("voxgate SIP on udp://{}", sip.local_addr());
    // A hint only: the server is announced and serving, so a database that
    // goes away now is reported by /ready, not by exiting.
    if crate::orgs::list(&db).await.is_ok_and(|a| a.is_empty()) {
        println!(
            "No organisations yet. Create one and its first key with:\n  voxgate orgs create --name \"My company\" --plan enterprise --credits 10000\n  voxgate keys create --org <org id>"
        );
    }
    let _ = std::io::stdout().flush();

    let grace = Duration::from_secs(state.config.calls.shutdown_grace_secs);
    let state_node_id = state.config.node_id.clone();
    let app = crate::api::router(state);
    // HTTP keeps serving (status, hang-up) while calls finish.
    let signal = {
        let (shutdown, calls) = (shutdown.clone(), calls.clone());
        async move {
            shutdown_signal(shutdown).await;
            calls.shutdown(grace).await;
        }
    };
    axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(signal)
        .await
        .context("HTTP server failed")?;

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = writer_task.await;
        let _ = key_usage_task.await;
        let _ = limiter_task.await;
        let _ = webhook_task.await;
        let _ = job_task.await;
        let _ = cluster_task.await;
    })
    .await;
    crate::cluster::leave(&db, &state_node_id).await;
    db.pool.close().await;
    tracing::info!("voxgate stopped");
    Ok(())
}

/// Inbound calls reach an agent once inbound routing exists; until then
/// the SIP agent's answer is followed by a BYE.
async fn refuse_inbound(mut inbound: tokio::sync::mpsc::Receiver<voxgate_sip::InboundCall>) {
    while let Some(call) = inbound.recv().await {
        tracing::warn!(to = %call.to, "inbound call to a number with no agent; hanging up");
        call.call.hangup().await;
    }
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
