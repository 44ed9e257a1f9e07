//! One load-test run: the SIP side that answers, the dispatcher that places
//! calls through the API at the asked rate and concurrency, the sampler
//! (progress bar, timeline, server CPU and memory), and the tear-down.
//!
//! A call is matched to the INVITE it causes by the number it dials: each
//! call up at once gets its own number (`--number-prefix` + 4 digits), taken
//! from a pool before the API request and given back when the call is over
//! (unless voxgate never answered the request: a late INVITE for that
//! number must not reach another call).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use voxgate_media::streams::protocol::Provider;
use voxgate_sip::{Call, CallEvent, SipAgent, SipConfig};

use crate::api::Api;
use crate::options::{Options, Transport};
use crate::procstat::ProcSampler;
use crate::report::{percentile, CallRecord, Outcome, Report, Sample};
use crate::script::{ms, Script};

/// How long an accepted call may take to reach our SIP side.
const INVITE_WITHIN: Duration = Duration::from_secs(10);
/// After the run's end, calls get this long to hang up before the report.
const TEARDOWN: Duration = Duration::from_secs(10);

/// Counters the progress bar and the timeline read.
#[derive(Default)]
struct Live {
    active: AtomicU32,
    answered: AtomicU32,
    failed: AtomicU32,
    done: AtomicU32,
    latencies: Mutex<Vec<f64>>,
}

/// Everything a call task needs.
struct Shared {
    api: Api,
    agent: String,
    trunk: Option<String>,
    transport: Transport,
    script: Script,
    prefix: String,
    numbers: Mutex<Vec<u32>>,
    routes: Mutex<HashMap<String, oneshot::Sender<Call>>>,
    live: Live,
    epoch: Instant,
    stop: CancellationToken,
}

/// Runs the load test until every call is done, `--duration` passes or
/// `interrupt` fires; every call still up is hung up before it returns.
pub async fn run(o: &Options, interrupt: CancellationToken) -> anyhow::Result<Report> {
    o.validate().map_err(anyhow::Error::msg)?;
    let api = Api::new(o.server.clone(), o.api_key.clone())?;
    let script = Script::prepare(o).await.context("preparing the caller's audio")?;
    let agent = api.agent(o).await?;
    let stop = interrupt.child_token();
    let sip_config = SipConfig {
        bind: o.sip_bind,
        rtp_port_min: o.rtp_ports.0,
        rtp_port_max: o.rtp_ports.1,
        inbound_numbers: vec!["*".into()],
        inbound_ring_ms: o.ring.as_millis() as u64,
        ..SipConfig::default()
    };
    let sip_stop = CancellationToken::new();
    let (_sip, mut inbound) = SipAgent::start(sip_config, sip_stop.clone()).await.with_context(|| format!("SIP on {}", o.sip_bind))?;
    let epoch = Instant::now();
    let shared = Arc::new(Shared {
        api,
        agent: agent.clone(),
        trunk: o.trunk.clone(),
        transport: o.transport,
        script,
        prefix: o.number_prefix.clone(),
        // All four-digit numbers, lowest first: the ones a call up at once
        // needs, and spares for those never given back.
        numbers: Mutex::new((0..10_000).rev().collect()),
        routes: Mutex::new(HashMap::new()),
        live: Live::default(),
        epoch,
        stop: stop.clone(),
    });

    // INVITEs go to the call that dialled their number.
    let router = shared.clone();
    let routing = tokio::spawn(async move {
        while let Some(inbound) = inbound.recv().await {
            let waiting = router.routes.lock().ok().and_then(|mut r| r.remove(&inbound.to));
            match waiting {
                Some(tx) => {
                    let _ = tx.send(inbound.call);
                }
                None => {
                    tracing::warn!(number = %inbound.to, "a call nobody here placed; hanging up");
                    inbound.call.hangup().await;
                }
            }
        }
    });

    let progress = progress_bar(o);
    let timeline = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn(sample(shared.clone(), o.server_pid, progress.clone(), timeline.clone()));

    let deadline = tokio::time::Instant::now() + o.duration;
    let slots = Arc::new(Semaphore::new(o.concurrency as usize));
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / o.cps));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = JoinSet::new();
    for index in 0..o.calls {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot?,
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
        };
        tokio::select! {
            _ = pace.tick() => {}
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
        }
        let shared = shared.clone();
        calls.spawn(async move {
            let record = place_and_play(&shared, index).await;
            drop(slot);
            record
        });
    }
    let mut records = Vec::with_capacity(o.calls as usize);
    tokio::select! {
        _ = collect(&mut calls, &mut records) => {}
        _ = tokio::time::sleep_until(deadline) => {}
        _ = stop.cancelled() => {}
    }
    // Calls still up hang up (BYE) on their own; give them a bounded time.
    stop.cancel();
    let _ = tokio::time::timeout(TEARDOWN, collect(&mut calls, &mut records)).await;
    calls.abort_all();
    sampler.abort();
    let _ = sampler.await;
    progress.finish_and_clear();
    sip_stop.cancel();
    routing.abort();
    records.sort_by_key(|r| r.index);
    let timeline = timeline.lock().map(|t| t.clone()).unwrap_or_default();
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0).saturating_sub(epoch.elapsed().as_secs());
    Ok(Report::new(o, agent, started_unix, ms(epoch.elapsed()), records, timeline))
}

/// Adds each call's record as its task ends (cancel-safe: what was
/// collected stays collected).
async fn collect(calls: &mut JoinSet<CallRecord>, records: &mut Vec<CallRecord>) {
    while let Some(done) = calls.join_next().await {
        match done {
            Ok(record) => records.push(record),
            Err(e) => tracing::error!(error = %e, "a call task failed"),
        }
    }
}

/// One call: a number, the API request, the INVITE, the script.
async fn place_and_play(shared: &Shared, index: u32) -> CallRecord {
    let slot = shared.numbers.lock().ok().and_then(|mut n| n.pop()).unwrap_or(index % 10_000);
    let number = format!("{}{:04}", shared.prefix, slot);
    let mut record = CallRecord::new(index, number.clone(), ms(shared.epoch.elapsed()));
    let (tx, rx) = oneshot::channel();
    if let Ok(mut r) = shared.routes.lock() {
        r.insert(number.clone(), tx);
    }
    let live = &shared.live;
    live.active.fetch_add(1, Ordering::Relaxed);
    let requested = Instant::now();
    let outcome = match shared.transport.provider() {
        Some(provider) => stream_and_play(shared, provider, requested, &mut record).await,
        None => place_and_answer(shared, &number, rx, requested, &mut record).await,
    };
    if let Ok(mut r) = shared.routes.lock() {
        r.remove(&number);
    }
    // A placement voxgate never answered may still have made a call: its
    // INVITE, however late, must not reach the next call given this number,
    // so the number is not given out again in this run.
    let unanswered = matches!(&outcome, Outcome::Refused(r) if r.status == 0);
    if let (false, Ok(mut n)) = (unanswered, shared.numbers.lock()) {
        n.push(slot);
    }
    let failed = !matches!(outcome, Outcome::Answered);
    record.outcome = outcome;
    record.ended_ms = ms(shared.epoch.elapsed());
    live.active.fetch_sub(1, Ordering::Relaxed);
    live.done.fetch_add(1, Ordering::Relaxed);
    if failed {
        live.failed.fetch_add(1, Ordering::Relaxed);
    }
    record
}

/// A call over SIP: the API request, then the INVITE it causes.
async fn place_and_answer(shared: &Shared, number: &str, rx: oneshot::Receiver<Call>, requested: Instant, record: &mut CallRecord) -> Outcome {
    match shared.api.place(record.index, &shared.agent, number, shared.trunk.as_deref()).await {
        Err(refusal) => Outcome::Refused(refusal),
        Ok(call_id) => {
            record.call_id = Some(call_id.clone());
            let invite = tokio::select! {
                call = tokio::time::timeout(INVITE_WITHIN, rx) => call.ok().and_then(Result::ok),
                _ = shared.stop.cancelled() => None,
            };
            match invite {
                None => {
                    shared.api.hangup(&call_id).await;
                    Outcome::NoInvite
                }
                Some(call) => answer_and_play(shared, call, requested, record).await,
            }
        }
    }
}

/// A call over a media stream: the API request, then our connection as the provider.
async fn stream_and_play(shared: &Shared, provider: Provider, requested: Instant, record: &mut CallRecord) -> Outcome {
    match shared.api.place_stream(record.index, &shared.agent, provider.as_str()).await {
        Err(refusal) => Outcome::Refused(refusal),
        Ok((call_id, url)) => {
            record.call_id = Some(call_id.clone());
            match crate::stream::connect(&url, provider, &call_id).await {
                Ok(call) => answer_and_play(shared, call, requested, record).await,
                Err(e) => {
                    shared.api.hangup(&call_id).await;
                    Outcome::NotAnswered { reason: format!("websocket: {e}") }
                }
            }
        }
    }
}

/// Rings, answers (the SIP agent does both), then runs the caller's script.
async fn answer_and_play(shared: &Shared, mut call: Call, requested: Instant, record: &mut CallRecord) -> Outcome {
    let answered = loop {
        let ev = tokio::select! {
            ev = call.events.recv() => ev,
            _ = shared.stop.cancelled() => {
                call.hangup().await;
                return Outcome::NotAnswered { reason: "stopped".into() };
            }
        };
        match ev {
            Some(CallEvent::Ringing { at, .. }) => record.post_dial_delay_ms = Some(ms(at - requested)),
            Some(CallEvent::Answered { at }) => break at,
            Some(CallEvent::Ended(o)) => return Outcome::NotAnswered { reason: o.reason.as_str().to_owned() },
            Some(_) => {}
            None => return Outcome::NotAnswered { reason: "lost".into() },
        }
    };
    record.post_dial_delay_ms.get_or_insert(ms(answered - requested));
    shared.live.answered.fetch_add(1, Ordering::Relaxed);
    let heard = shared.script.run(call, answered, shared.epoch, &shared.stop).await;
    if let Ok(mut l) = shared.live.latencies.lock() {
        l.extend(heard.turns.iter().filter_map(|t| t.latency_ms));
    }
    record.heard = Some(heard);
    Outcome::Answered
}

fn progress_bar(o: &Options) -> ProgressBar {
    let bar = ProgressBar::new(u64::from(o.calls));
    if o.no_progress {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} calls  {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Every second: the timeline sample and the progress bar.
async fn sample(shared: Arc<Shared>, server_pid: Option<u32>, bar: ProgressBar, timeline: Arc<Mutex<Vec<Sample>>>) {
    let mut server = server_pid.map(|pid| ProcSampler::new(Some(pid)));
    let mut me = ProcSampler::new(None);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let live = &shared.live;
        let (server_now, me_now) = (server.as_mut().and_then(ProcSampler::sample), me.sample());
        let (p50, p95) = match live.latencies.lock() {
            Ok(l) => (percentile(&l, 50.0), percentile(&l, 95.0)),
            Err(_) => (None, None),
        };
        let s = Sample {
            at_ms: ms(shared.epoch.elapsed()),
            active: live.active.load(Ordering::Relaxed),
            answered: live.answered.load(Ordering::Relaxed),
            failed: live.failed.load(Ordering::Relaxed),
            server_cpu_percent: server_now.and_then(|s| s.cpu_percent),
            server_rss_mb: server_now.map(|s| s.rss_mb),
            loadtest_cpu_percent: me_now.and_then(|s| s.cpu_percent),
            loadtest_rss_mb: me_now.map(|s| s.rss_mb),
        };
        bar.set_position(u64::from(live.done.load(Ordering::Relaxed)));
        let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} ms"));
        bar.set_message(format!("active {}  failed {}  latency p50 {} p95 {}", s.active, s.failed, fmt(p50), fmt(p95)));
        if let Ok(mut t) = timeline.lock() {
            t.push(s);
        }
    }
}
