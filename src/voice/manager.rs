//! The call manager: admits calls, and runs each one as a task that owns
//! its leg (a SIP dialog with RTP, or a CPaaS call with a WebSocket media
//! stream), its media session and its agent `Session`. The carriers differ
//! only in how the leg is set up ([`Leg`]); from then on every call is run,
//! billed and recorded by the same code.
//!
//! The call task moves audio between media and agent and never waits on the
//! database: status changes go to the call writer ([`writer`]) through a
//! channel, and each minute's debit runs as a task of its own whose result
//! comes back to the call. Billing: 10 credits (configurable) per started
//! minute of connected time, debited when the minute starts; before a minute
//! the balance cannot cover, the agent says its closing line and hangs up
//! (`insufficient-credits`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use voxgate_agents::{AgentConfig, AgentEvent, HangupReason, Session, Speaker};
use voxgate_media::session::{MediaEvent, MediaHandle};
use voxgate_media::streams::StreamEvent;
use voxgate_sip::{Call, CallEvent, CallStatus, Dial, EndReason, Outcome, SipAgent};

use super::agents::Agent;
use super::calls::{self, Admission, CallUpdate, Latency, NewCall, QuotaState, Settlement, TranscriptLine, TurnLatency};
use super::engines::SpeechEngines;
use super::streams::{self, StreamKind, Streams};
use super::twilio::{self, CarrierConfig};
use super::writer::{self, CallWriter};
use crate::billing::ledger::{self, IdempotencyKey, Reason};
use crate::clock::now_ms;
use crate::config::CallsConfig;
use crate::db::Db;
use crate::billing::Spender;
use crate::domain::{CallId, Credits, OrgId, PhoneNumber};
use crate::metrics::Metrics;
use crate::webhooks::Webhooks;
use crate::{Error, Result};

/// The closing line starts this long before a minute the balance cannot
/// cover (at most half a minute), so the call ends before that minute.
const CLOSING_LEAD: Duration = Duration::from_secs(8);
/// After a closing line was asked for, the call ends by this much later
/// even if the line has not finished.
const CLOSING_LIMIT: Duration = Duration::from_secs(6);
/// Time for the last agent frames to leave before the BYE.
const DRAIN_BEFORE_BYE: Duration = Duration::from_millis(300);

/// An outbound call to place, validated.
pub struct Outbound {
    pub account: OrgId,
    /// The key placing it: its minutes count against that key's daily cap.
    pub spender: Option<Spender>,
    pub agent: Agent,
    pub to: PhoneNumber,
    pub trunk: Option<String>,
    pub metadata: Option<Value>,
    pub idempotency_key: Option<String>,
}

/// A call a provider's media stream (or a browser over WebRTC) brings in:
/// the account's agent takes whatever connects to the URL.
pub struct StreamCall {
    pub account: OrgId,
    pub spender: Option<Spender>,
    pub agent: Agent,
    pub kind: StreamKind,
    /// The number the caller reached, and the caller's, when known.
    pub to: Option<PhoneNumber>,
    pub from: Option<PhoneNumber>,
    pub metadata: Option<Value>,
    pub idempotency_key: Option<String>,
}

/// A stream call admitted: where the provider must connect, and until when.
#[derive(Debug)]
pub struct StreamPlaced {
    pub id: CallId,
    pub url: String,
    /// Unix seconds.
    pub expires: i64,
}

/// How a call's leg is set up.
#[derive(Debug, Clone)]
enum Leg {
    /// INVITE through a SIP trunk.
    Sip(Dial),
    /// A call placed with a CPaaS's REST API, audio over a media stream.
    Twilio { carrier: String, number: String },
    /// A call the provider (or a browser) connects to a URL we gave out.
    Stream(StreamKind),
}

#[derive(Debug)]
pub enum Placed {
    New { id: CallId, quota: QuotaState },
    Replayed { id: CallId },
}

/// Why this side ends a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Api,
    AgentEnded,
    MaxDuration,
    InsufficientCredits,
    /// The key that placed the call reached its daily credit cap.
    CreditCap,
    BillingUnavailable,
    Shutdown,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Ending::Api => "local-hangup",
            Ending::AgentEnded => "agent-hangup",
            Ending::MaxDuration => "max-duration",
            Ending::InsufficientCredits => "insufficient-credits",
            Ending::CreditCap => "credit-cap",
            Ending::BillingUnavailable => "billing-unavailable",
            Ending::Shutdown => "shutdown",
        }
    }
}

/// What the manager uses of the rest of the process.
pub struct Dependencies {
    /// Names of the configured SIP trunks.
    pub trunks: Vec<String>,
    /// CPaaS accounts that place calls over media streams (`[[carriers]]`).
    pub carriers: Vec<CarrierConfig>,
    pub streams: Streams,
    pub sip: SipAgent,
    pub engines: Arc<SpeechEngines>,
    pub webhooks: Webhooks,
    pub metrics: Arc<Metrics>,
}

#[derive(Clone)]
pub struct CallManager {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    config: CallsConfig,
    node_id: String,
    trunks: Vec<String>,
    carriers: Vec<CarrierConfig>,
    streams: Streams,
    http: reqwest::Client,
    sip: SipAgent,
    engines: Arc<SpeechEngines>,
    metrics: Arc<Metrics>,
    writer: CallWriter,
    active: Mutex<HashMap<CallId, mpsc::Sender<Ending>>>,
    slots: Arc<Semaphore>,
    accepting: AtomicBool,
    tracker: TaskTracker,
}

impl CallManager {
    /// Starts the manager and its writer; then closes the calls this node
    /// left open when it last died (`failed`, `node-lost`).
    pub async fn start(db: Db, config: CallsConfig, node_id: String, deps: Dependencies) -> Result<(CallManager, JoinHandle<()>)> {
        let Dependencies { trunks, carriers, streams, sip, engines, webhooks, metrics } = deps;
        let (writer, writer_task) = writer::start(db.clone(), webhooks);
        let slots = Arc::new(Semaphore::new(config.max_concurrent));
        let inner = Inner {
            db,
            config,
            node_id,
            trunks,
            carriers,
            streams,
            http: reqwest::Client::new(),
            sip,
            engines,
            metrics,
            writer,
            active: Mutex::new(HashMap::new()),
            slots,
            accepting: AtomicBool::new(true),
            tracker: TaskTracker::new(),
        };
        let manager = CallManager { inner: Arc::new(inner) };
        let node_id = manager.inner.node_id.clone();
        manager.close_node(&node_id, now_ms()).await?;
        Ok((manager, writer_task))
    }

    /// Calls running in this process.
    pub fn active(&self) -> usize {
        self.inner.active.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Admits and places an outbound call; returns as soon as the call task
    /// runs (the INVITE leaves from it at once).
    pub async fn place(&self, call: Outbound) -> Result<Placed> {
        let this = self.clone();
        self.detached(move |gone| async move { this.place_now(call, gone).await }, |placed| placed).await
    }

    /// Runs an admission in a task of its own, so that the request which
    /// asked for it going away (a client that gives up, the request
    /// timeout) cannot cut it between the call's row and its task: that
    /// left the call queued for ever. An admission that finds its requester
    /// gone does not start; one admitted after it left is hung up at once
    /// (the client was told it failed, and may place it again).
    async fn detached<T, F>(&self, admission: impl FnOnce(CancellationToken) -> F, placed: fn(&T) -> &Placed) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let gone = CancellationToken::new();
        let _requester = gone.clone().drop_guard();
        let (answer, answered) = oneshot::channel();
        let this = self.clone();
        let admission = admission(gone);
        self.inner.tracker.spawn(async move {
            if let Err(Ok(unwanted)) = answer.send(admission.await) {
                if let Placed::New { id, .. } = placed(&unwanted) {
                    tracing::warn!(call_id = %id, "the request that placed this call went away: hanging it up");
                    this.hangup(*id).await;
                }
            }
        }.instrument(tracing::Span::current()));
        answered.await.map_err(|_| Error::Internal(anyhow::anyhow!("the call's admission ended without an answer")))?
    }

    async fn place_now(&self, call: Outbound, gone: CancellationToken) -> Result<Placed> {
        let inner = &self.inner;
        let leg = self.outbound_leg(call.trunk.as_deref(), &call.to)?;
        let new = NewCall {
            account: call.account,
            agent: call.agent.id.parse()?,
            direction: "outbound",
            carrier: match &leg {
                Leg::Sip(_) => "sip",
                _ => "twilio",
            },
            to: Some(call.to.as_str()),
            trunk: call.trunk.as_deref(),
            from: None,
            metadata: call.metadata.as_ref(),
            idempotency_key: call.idempotency_key.as_deref(),
            node_id: &inner.node_id,
            spender: call.spender,
        };
        match self.admit_and_run(&call.agent, call.account, new, leg, &gone).await? {
            Admission::Replayed { id } => Ok(Placed::Replayed { id }),
            Admission::Placed { id, quota } => Ok(Placed::New { id, quota }),
        }
    }

    /// Admits a call that a provider's media stream will bring in, and
    /// returns the stream URL to give the provider.
    pub async fn place_stream(&self, call: StreamCall) -> Result<(Placed, Option<StreamPlaced>)> {
        let this = self.clone();
        self.detached(move |gone| async move { this.place_stream_now(call, gone).await }, |(placed, _)| placed).await
    }

    async fn place_stream_now(&self, call: StreamCall, gone: CancellationToken) -> Result<(Placed, Option<StreamPlaced>)> {
        let inner = &self.inner;
        let new = NewCall {
            account: call.account,
            agent: call.agent.id.parse()?,
            direction: "inbound",
            carrier: call.kind.as_str(),
            to: call.to.as_ref().map(PhoneNumber::as_str),
            trunk: None,
            from: call.from.as_ref().map(PhoneNumber::as_str),
            metadata: call.metadata.as_ref(),
            idempotency_key: call.idempotency_key.as_deref(),
            node_id: &inner.node_id,
            spender: call.spender,
        };
        match self.admit_and_run(&call.agent, call.account, new, Leg::Stream(call.kind), &gone).await? {
            Admission::Replayed { id } => Ok((Placed::Replayed { id }, None)),
            Admission::Placed { id, quota } => {
                let expires = now_ms() / 1000 + inner.streams.connect_timeout().as_secs() as i64;
                let url = inner.streams.url(id, call.kind, expires);
                Ok((Placed::New { id, quota }, Some(StreamPlaced { id, url, expires })))
            }
        }
    }

    /// The leg an outbound call through `trunk` (the first SIP trunk, else
    /// the first carrier, by default) takes.
    fn outbound_leg(&self, trunk: Option<&str>, to: &PhoneNumber) -> Result<Leg> {
        let inner = &self.inner;
        let number = to.to_string();
        let carrier = |name: &str| Leg::Twilio { carrier: name.to_owned(), number: number.clone() };
        match trunk {
            Some(name) if inner.trunks.iter().any(|t| t == name) => Ok(Leg::Sip(Dial { trunk: Some(name.to_owned()), number })),
            Some(name) if inner.carriers.iter().any(|c| c.name == name) => Ok(carrier(name)),
            Some(name) => {
                let configured: Vec<&str> =
                    inner.trunks.iter().map(String::as_str).chain(inner.carriers.iter().map(|c| c.name.as_str())).collect();
                Err(Error::bad_request(format!("trunk '{name}' is not configured (configured: {})", configured.join(", "))))
            }
            None if !inner.trunks.is_empty() => Ok(Leg::Sip(Dial { trunk: None, number })),
            None => match inner.carriers.first() {
                Some(c) => Ok(carrier(&c.name)),
                None => Err(Error::Unavailable("no SIP trunk or carrier is configured for outbound calls".into())),
            },
        }
    }

    /// Checks the agent's engines and this node's capacity, admits the call
    /// (credits, quota, idempotency) and starts its task.
    async fn admit_and_run(&self, agent: &Agent, account: OrgId, new: NewCall<'_>, leg: Leg, gone: &CancellationToken) -> Result<Admission> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::Acquire) {
            return Err(Error::Unavailable("this node is shutting down; retry on another".into()));
        }
        let engines = if inner.config.echo {
            None
        } else {
            let engines = inner.engines.get().await?;
            let agent_config = AgentConfig { turn: inner.config.turn.clone(), ..agent.engine_config() };
            engines
                .check(&agent_config.llm_model, &agent_config.tts_model, &agent_config.language)
                .map_err(|e| Error::bad_request(e.to_string()))?;
            Some((engines, agent_config))
        };
        let slot = inner.slots.clone().try_acquire_owned().map_err(|_| {
            Error::Unavailable(format!("this node is at its limit of {} concurrent calls", inner.config.max_concurrent))
        })?;
        let spender = new.spender;
        if gone.is_cancelled() {
            return Err(Error::Unavailable("the request went away before the call was admitted".into()));
        }
        let admission = calls::admit(&inner.db, new, inner.config.hourly_limit, inner.config.credits_per_minute).await?;
        let Admission::Placed { id, .. } = &admission else { return Ok(admission) };
        let id = *id;
        let (commands_tx, commands_rx) = mpsc::channel(4);
        if let Ok(mut active) = inner.active.lock() {
            active.insert(id, commands_tx);
        }
        inner.metrics.calls_active.inc();
        let leg_kind = match &leg {
            Leg::Stream(kind) => Some(*kind),
            _ => None,
        };
        let run = CallRun {
            inner: inner.clone(),
            id,
            account,
            spender,
            leg,
            commands: commands_rx,
            // A stream's URL is given out when this returns: the call must
            // already wait for it.
            opened: leg_kind.as_ref().map(|kind| inner.streams.open(id, *kind)),
            slot,
        };
        let session = engines.map(|(engines, agent_config)| Session::start(engines, agent_config));
        let span = tracing::info_span!("call", call_id = %id, org_id = %account);
        inner.tracker.spawn(run.run(session).instrument(span));
        Ok(admission)
    }

    /// The media streams of this node's calls.
    pub fn streams(&self) -> &Streams {
        &self.inner.streams
    }

    /// Hangs up a call this process runs (CANCEL before answer, BYE after).
    /// False when it is not running here.
    pub async fn hangup(&self, id: CallId) -> bool {
        match self.commands(id) {
            Some(tx) => tx.send(Ending::Api).await.is_ok(),
            None => false,
        }
    }

    /// The command queue of a call running here.
    fn commands(&self, id: CallId) -> Option<mpsc::Sender<Ending>> {
        self.inner.active.lock().ok().and_then(|a| a.get(&id).cloned())
    }

    /// Hangs up the calls of this node whose hang-up was asked of another
    /// node (through the database); returns how many were asked.
    pub async fn take_remote_hangups(&self) -> Result<usize> {
        let ids = calls::hangups_requested(&self.inner.db, &self.inner.node_id).await?;
        for id in &ids {
            // A full queue already holds an ending; the call is on its way out.
            if let Some(tx) = self.commands(*id) {
                if tx.try_send(Ending::Api).is_ok() {
                    tracing::info!(call_id = %id, "hang-up asked through another node");
                }
            }
        }
        Ok(ids.len())
    }

    /// Closes the calls `node` (another found dead, or this one at start,
    /// after it died) created before `before` (ms) and never ended; returns
    /// how many this call closed.
    pub async fn close_node(&self, node: &str, before: i64) -> Result<usize> {
        let closed = calls::close_lost(&self.inner.db, node, before).await?;
        for (id, account) in &closed {
            tracing::warn!(call_id = %id, node_id = node, "call closed as node-lost: its node stopped while it was in progress");
            self.inner.writer.ended_elsewhere(*id, *account);
        }
        Ok(closed.len())
    }

    /// Hangs up every call of this process (it was declared dead, and its
    /// calls were settled by another node).
    pub async fn hang_up_all(&self) {
        let senders: Vec<_> = self.inner.active.lock().map(|a| a.values().cloned().collect()).unwrap_or_default();
        for tx in senders {
            let _ = tx.send(Ending::Shutdown).await;
        }
    }

    /// Stops taking calls, lets the running ones finish for up to `grace`,
    /// hangs up the rest, and waits until every call is settled.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.accepting.store(false, Ordering::Release);
        inner.tracker.close();
        let running = self.active();
        if running > 0 {
            tracing::info!(calls = running, grace_secs = grace.as_secs(), "waiting for calls in progress to finish");
        }
        if tokio::time::timeout(grace, inner.tracker.wait()).await.is_err() {
            tracing::warn!(calls = self.active(), "grace period over, hanging up the calls still in progress");
            self.hang_up_all().await;
            if tokio::time::timeout(Duration::from_secs(10), inner.tracker.wait()).await.is_err() {
                tracing::error!("calls did not end after hang-up; they will be closed as node-lost at next start");
            }
        }
        inner.writer.close();
    }
}

/// One call, from INVITE to settlement.
struct CallRun {
    inner: Arc<Inner>,
    id: CallId,
    account: OrgId,
    spender: Option<Spender>,
    leg: Leg,
    commands: mpsc::Receiver<Ending>,
    /// The media leg of a stream call, opened at admission.
    opened: Option<(MediaHandle, mpsc::Receiver<StreamEvent>)>,
    slot: OwnedSemaphorePermit,
}

/// The minute clock of an answered call.
struct Billing {
    answered: TokioInstant,
    minute: Duration,
    /// Minutes debited so far.
    paid: u32,
    /// The balance check before the next minute was made.
    checked: bool,
    /// A debit or balance check in flight.
    pending: Option<JoinHandle<BillingResult>>,
}

enum BillingResult {
    Debited,
    Refused,
    /// The placing key's daily cap does not cover the next minute.
    CapReached,
    BalanceOk,
    BalanceLow,
    Unavailable,
}

impl Billing {
    fn next_minute_at(&self) -> TokioInstant {
        self.answered + self.minute * self.paid
    }

    fn check_at(&self) -> TokioInstant {
        let lead = CLOSING_LEAD.min(self.minute / 2);
        self.next_minute_at().checked_sub(lead).unwrap_or_else(|| self.next_minute_at())
    }
}

/// The agent's session, or `None` when calls echo (`calls.echo`).
type SessionStart = Option<std::result::Result<(Session, mpsc::Receiver<AgentEvent>), voxgate_agents::AgentError>>;

fn line_of(t: voxgate_agents::Transcript) -> TranscriptLine {
    TranscriptLine {
        role: match t.speaker {
            Speaker::Caller => "caller",
            Speaker::Agent => "agent",
        }
        .into(),
        text: t.text,
        start_ms: t.start_ms,
        end_ms: t.end_ms,
        interrupted: t.interrupted,
    }
}

/// Points a timer that lives across a `select!` loop's turns at `at`. It is
/// moved only when the deadline changes: a timer made anew on each turn
/// would be registered with the runtime and cancelled again for every audio
/// frame, 50 times a second per call.
fn arm(timer: std::pin::Pin<&mut tokio::time::Sleep>, at: Option<TokioInstant>) {
    if let Some(at) = at {
        if timer.deadline() != at {
            timer.reset(at);
        }
    }
}

impl CallRun {
    async fn run(mut self, session: SessionStart) {
        let settlement = self.converse(session).await;
        let inner = self.inner.clone();
        let m = &inner.metrics;
        m.calls_active.dec();
        m.calls_ended.with_label_values(&[&settlement.status, &settlement.reason]).inc();
        for t in &settlement.latency.turns {
            m.voice_to_voice.observe(f64::from(t.voice_to_voice_ms) / 1000.0);
        }
        if let Some(ms) = settlement.latency.answer_to_greeting_ms {
            m.answer_to_greeting.observe(f64::from(ms) / 1000.0);
        }
        inner.writer.send(self.id, self.account, CallUpdate::Ended(settlement));
        if let Ok(mut active) = inner.active.lock() {
            active.remove(&self.id);
        }
        drop(self.slot);
    }

    fn settlement(status: CallStatus, reason: &str, outcome: Option<&Outcome>) -> Settlement {
        Settlement {
            status: status.as_str().into(),
            reason: reason.into(),
            sip_code: outcome.and_then(|o| o.sip_code),
            sip_reason: outcome.and_then(|o| o.sip_reason.clone()),
            at: now_ms(),
            transcript: Vec::new(),
            latency: Latency::default(),
        }
    }

    async fn converse(&mut self, session: SessionStart) -> Settlement {
        // Echo calls have no agent: its events channel stays open and silent.
        let (session, mut agent_events, _no_agent) = match session {
            Some(Ok((session, events))) => (Some(session), events, None),
            Some(Err(e)) => {
                tracing::error!(error = %e, "agent session did not start");
                return Self::settlement(CallStatus::Failed, "agent-error", None);
            }
            None => {
                let (tx, rx) = mpsc::channel(1);
                (None, rx, Some(tx))
            }
        };
        let mut call = match self.set_up().await {
            Ok(call) => call,
            Err(outcome) => return Self::settlement(outcome.status, outcome.reason.as_str(), Some(&outcome)),
        };
        let writer = &self.inner.writer;
        if !call.call_id.is_empty() {
            writer.send(self.id, self.account, CallUpdate::Dialing { sip_call_id: call.call_id.clone() });
        }

        let mut transcript: Vec<TranscriptLine> = Vec::new();
        let mut latency = Latency::default();
        let mut billing: Option<Billing> = None;
        let mut answered_at: Option<Instant> = None;
        let mut ending: Option<Ending> = None;
        let mut bye_at: Option<TokioInstant> = None;
        let mut greeting_heard = false;
        let minute = Duration::from_secs(self.inner.config.minute_secs);
        let billing_timer = tokio::time::sleep(Duration::ZERO);
        let bye_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(billing_timer, bye_timer);
        let outcome = loop {
            let billing_at = match &billing {
                Some(b) if b.pending.is_none() && ending.is_none() => Some(if b.checked { b.next_minute_at() } else { b.check_at() }),
                _ => None,
            };
            arm(billing_timer.as_mut(), billing_at);
            let billing_done = async {
                match billing.as_mut().and_then(|b| b.pending.as_mut()) {
                    Some(handle) => handle.await.unwrap_or(BillingResult::Unavailable),
                    None => std::future::pending().await,
                }
            };
            arm(bye_timer.as_mut(), bye_at);
            tokio::select! {
                ev = call.events.recv() => match ev {
                    Some(CallEvent::Ringing { .. }) => writer.send(self.id, self.account, CallUpdate::Ringing { at: now_ms() }),
                    Some(CallEvent::Answered { at }) => {
                        answered_at = Some(at);
                        writer.send(self.id, self.account, CallUpdate::Answered { at: now_ms() });
                        if let Some(session) = &session {
                            session.answered().await;
                        }
                        let mut b = Billing { answered: TokioInstant::from_std(at), minute, paid: 0, checked: true, pending: None };
                        b.pending = Some(self.debit(1));
                        billing = Some(b);
                    }
                    Some(CallEvent::Ended(outcome)) => break Some(outcome),
                    Some(CallEvent::EarlyMedia | CallEvent::Modified { .. }) => {}
                    None => break None,
                },
                frame = call.media.incoming.recv() => match frame {
                    Some(frame) if answered_at.is_some() => match &session {
                        Some(session) => session.push_audio(frame.pcm, frame.received_at.unwrap_or_else(Instant::now)).await,
                        None => call.media.control.play(frame.pcm).await,
                    },
                    Some(_) => {}
                    None => break None,
                },
                Some(ev) = call.media.events.recv() => {
                    if let (MediaEvent::PlayoutStarted { at }, Some(answered), false) = (ev, answered_at, greeting_heard) {
                        greeting_heard = true;
                        latency.answer_to_greeting_ms = Some(at.saturating_duration_since(answered).as_millis() as u32);
                    }
                }
                ev = agent_events.recv() => match ev {
                    Some(AgentEvent::AgentAudio(pcm)) => call.media.control.play(pcm).await,
                    Some(AgentEvent::ClearAudio) => call.media.control.flush().await,
                    Some(AgentEvent::Transcript(t)) if t.is_final => transcript.push(line_of(t)),
                    Some(AgentEvent::Transcript(_)) => {}
                    Some(AgentEvent::TurnMetrics(m)) => latency.turns.push(TurnLatency {
                        turn: m.turn,
                        voice_to_voice_ms: m.voice_to_voice_ms,
                        endpoint_ms: m.endpoint_ms,
                        asr_ms: m.asr_ms,
                        reply_start_ms: m.reply_start_ms,
                        llm_first_token_ms: m.llm_first_token_ms,
                        llm_first_piece_ms: m.llm_first_piece_ms,
                        tts_first_audio_ms: m.tts_first_audio_ms,
                        speculative: m.speculative,
                    }),
                    Some(AgentEvent::Hangup(reason)) => {
                        let why = match reason {
                            HangupReason::AgentEnded => Ending::AgentEnded,
                            HangupReason::MaxDuration => Ending::MaxDuration,
                            HangupReason::Requested => ending.unwrap_or(Ending::InsufficientCredits),
                        };
                        tracing::info!(reason = why.as_str(), "agent ends the call");
                        ending.get_or_insert(why);
                        bye_at = Some(TokioInstant::now() + DRAIN_BEFORE_BYE);
                    }
                    None => {}
                },
                cmd = self.commands.recv() => {
                    let why = cmd.unwrap_or(Ending::Shutdown);
                    tracing::info!(reason = why.as_str(), "hanging up");
                    ending.get_or_insert(why);
                    call.hangup().await;
                }
                _ = &mut bye_timer, if bye_at.is_some() => {
                    bye_at = None;
                    call.hangup().await;
                }
                _ = &mut billing_timer, if billing_at.is_some() => {
                    let b = billing.as_mut().expect("timer runs with billing");
                    b.pending = Some(if b.checked { self.debit(b.paid + 1) } else { self.balance_check() });
                }
                result = billing_done => {
                    let b = billing.as_mut().expect("result comes with billing");
                    b.pending = None;
                    match result {
                        BillingResult::Debited => {
                            b.paid += 1;
                            b.checked = false;
                            tracing::info!(minute = b.paid, "call minute debited");
                        }
                        BillingResult::BalanceOk => b.checked = true,
                        BillingResult::BalanceLow | BillingResult::Refused | BillingResult::CapReached | BillingResult::Unavailable => {
                            let why = match result {
                                BillingResult::Unavailable => Ending::BillingUnavailable,
                                BillingResult::CapReached => Ending::CreditCap,
                                _ => Ending::InsufficientCredits,
                            };
                            tracing::info!(reason = why.as_str(), minutes = b.paid, "closing the call");
                            ending.get_or_insert(why);
                            if b.paid == 0 {
                                // Not even the first minute: no conversation.
                                call.hangup().await;
                            } else {
                                match &session {
                                    Some(session) => {
                                        session.close_with(&self.inner.config.closing_line).await;
                                        bye_at = Some(TokioInstant::now() + CLOSING_LIMIT);
                                    }
                                    None => call.hangup().await,
                                }
                            }
                        }
                    }
                }
            }
        };
        if let Some(session) = session {
            session.close();
            // The session records the reply the hang-up cut short, then ends.
            let last_lines = async {
                while let Some(ev) = agent_events.recv().await {
                    if let AgentEvent::Transcript(t) = ev {
                        if t.is_final {
                            transcript.push(line_of(t));
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(300), last_lines).await;
        }
        if let Some(handle) = billing.and_then(|b| b.pending) {
            let _ = handle.await;
        }
        latency.summarise();
        let (status, reason) = match (&outcome, ending) {
            (Some(o), Some(why)) if o.status == CallStatus::Completed => (o.status, why.as_str().to_owned()),
            (Some(o), _) => (o.status, o.reason.as_str().to_owned()),
            (None, _) => (CallStatus::Failed, "transport-error".to_owned()),
        };
        let mut s = Self::settlement(status, &reason, outcome.as_ref());
        s.transcript = transcript;
        s.latency = latency;
        tracing::info!(status = %s.status, reason = %s.reason, "call ended");
        s
    }

    /// Sets up the call's leg: the INVITE leaves, the provider is asked to
    /// call, or the stream is awaited.
    async fn set_up(&mut self) -> std::result::Result<Call, Outcome> {
        let inner = &self.inner;
        let failed = |reason, detail: String| Outcome { status: CallStatus::Failed, reason, sip_code: None, sip_reason: Some(detail) };
        match &self.leg {
            Leg::Sip(dial) => {
                let call = inner.sip.dial(dial.clone()).await.map_err(|e| {
                    tracing::error!(error = %e, "dial failed");
                    Outcome { status: CallStatus::Failed, reason: EndReason::TransportError, sip_code: None, sip_reason: None }
                })?;
                tracing::info!(sip_call_id = %call.call_id, to = %dial.number, "INVITE sent");
                Ok(call)
            }
            Leg::Twilio { carrier, number } => {
                let config = inner.carriers.iter().find(|c| &c.name == carrier).ok_or_else(|| failed(EndReason::TransportError, "carrier gone".into()))?;
                let call = twilio::dial(&inner.streams, &inner.http, config, self.id, number).await.map_err(|e| {
                    tracing::warn!(error = %e, "the provider did not place the call");
                    failed(EndReason::Rejected, e)
                })?;
                tracing::info!(provider_call_id = %call.call_id, to = %number, "call placed with twilio");
                Ok(call)
            }
            Leg::Stream(kind) => {
                tracing::info!(carrier = kind.as_str(), "waiting for the call's media to connect");
                let (media, life) = self.opened.take().unwrap_or_else(|| inner.streams.open(self.id, *kind));
                Ok(streams::answer(&inner.streams, self.id, media, life))
            }
        }
    }

    /// Debits minute `n` in a task of its own (the audio loop goes on).
    fn debit(&self, n: u32) -> JoinHandle<BillingResult> {
        let (db, account, id, spender) = (self.inner.db.clone(), self.account, self.id, self.spender);
        let amount = Credits::new(self.inner.config.credits_per_minute);
        tokio::spawn(async move {
            let Ok(key) = IdempotencyKey::parse(&format!("call:{id}:minute:{n}")) else { return BillingResult::Unavailable };
            let reference = id.to_string();
            for attempt in 0..3 {
                match ledger::debit(&db, account, amount, Reason::CallMinute, Some(&reference), &key, spender).await {
                    Ok(_) => {
                        if let Err(e) = calls::sync_billing(&db, id).await {
                            tracing::warn!(error = %e, "call row not updated with its minutes (the ledger has them)");
                        }
                        return BillingResult::Debited;
                    }
                    Err(Error::PaymentRequired { .. }) => return BillingResult::Refused,
                    Err(Error::Forbidden(_)) => return BillingResult::CapReached,
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "minute debit failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            BillingResult::Unavailable
        })
    }

    fn balance_check(&self) -> JoinHandle<BillingResult> {
        let (db, account, spender) = (self.inner.db.clone(), self.account, self.spender);
        let needed = self.inner.config.credits_per_minute;
        tokio::spawn(async move {
            if let Some(key) = spender.filter(|s| s.capped).map(|s| s.key) {
                if matches!(ledger::cap_headroom(&db, key).await, Ok(Some(left)) if left < needed) {
                    return BillingResult::CapReached;
                }
            }
            match ledger::balance(&db, account).await {
                Ok(b) if b.get() >= needed => BillingResult::BalanceOk,
                Ok(_) => BillingResult::BalanceLow,
                // The debit at the minute decides; a failed read is not a refusal.
                Err(_) => BillingResult::BalanceOk,
            }
        })
    }
}
