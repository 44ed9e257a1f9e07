//! The SIP user agent: one rsipstack endpoint on UDP, a dialog layer, and a
//! task per call.
//!
//! rsipstack reports every dialog's state changes on one channel; a router
//! task hands each to its call's task by Call-ID. A call task owns the
//! call's dialog and timers, applies SDP to the call's media session, and
//! reports [`CallEvent`]s; the holder of the [`Call`] owns the media streams
//! and can hang up. In-dialog requests (BYE, re-INVITE, UPDATE, OPTIONS) are
//! matched to their dialog and handled by rsipstack, which answers BYE and
//! raises re-INVITEs here to be answered with our SDP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rsipstack::dialog::authenticate::Credential;
use rsipstack::dialog::dialog::{Dialog, DialogState, DialogStateSender, TerminatedReason};
use rsipstack::dialog::dialog_layer::DialogLayer;
use rsipstack::dialog::invitation::InviteOption;
use rsipstack::dialog::invite_dialog::InviteDialog;
use rsipstack::sip::{Header, HostWithPort, Method, Response, StatusCode, StatusCodeKind, Uri};
use rsipstack::transaction::Transaction;
use rsipstack::transport::udp::UdpConnection;
use rsipstack::transport::{SipAddr, TransportLayer};
use rsipstack::EndpointBuilder;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voxgate_media::sdp::{self, Codec, Direction, LocalMedia};
use voxgate_media::session::{self, MediaControl, MediaHandle, PortRange, SessionConfig};

use crate::config::{SipConfig, Transport};
use crate::error::SipError;
use crate::status::{CallStatus, EndReason, Outcome};

/// What a call reports to its holder.
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    /// 180 or 183 (the first one).
    Ringing { code: u16, at: Instant },
    /// 183 with SDP: the far end's early media is now received.
    EarlyMedia,
    /// 200 OK: the call is up.
    Answered { at: Instant },
    /// A re-INVITE changed the stream (hold is `SendOnly`/`Inactive` from the far end).
    Modified { remote_direction: Direction },
    /// The call is over.
    Ended(Outcome),
}

/// A call in progress, outbound or inbound.
pub struct Call {
    pub call_id: String,
    pub events: mpsc::Receiver<CallEvent>,
    pub media: MediaHandle,
    hangup: mpsc::Sender<()>,
}

impl Call {
    /// A call leg another carrier runs (a CPaaS over a WebSocket media
    /// stream): its events, its media, and where hang-up requests go.
    pub fn new(call_id: String, events: mpsc::Receiver<CallEvent>, media: MediaHandle, hangup: mpsc::Sender<()>) -> Call {
        Call { call_id, events, media, hangup }
    }

    /// CANCEL before answer, BYE after.
    pub async fn hangup(&self) {
        let _ = self.hangup.send(()).await;
    }

    /// Waits for the call to end (consuming events up to that point).
    pub async fn ended(&mut self) -> Option<Outcome> {
        while let Some(ev) = self.events.recv().await {
            if let CallEvent::Ended(o) = ev {
                return Some(o);
            }
        }
        None
    }
}

/// An inbound call that we answered.
pub struct InboundCall {
    pub to: String,
    pub from: String,
    pub call: Call,
}

/// Where and whom to call.
#[derive(Debug, Clone)]
pub struct Dial {
    /// A configured trunk's name; the first trunk when `None`.
    pub trunk: Option<String>,
    /// E.164, e.g. "+14155550123".
    pub number: String,
}

#[derive(Clone)]
pub struct SipAgent {
    inner: Arc<Inner>,
}

struct Inner {
    config: SipConfig,
    dialog_layer: Arc<DialogLayer>,
    local: SocketAddr,
    media_ip: IpAddr,
    ports: PortRange,
    /// Every leg's media settings.
    media: SessionConfig,
    routes: Mutex<HashMap<String, mpsc::UnboundedSender<DialogState>>>,
    state_sender: DialogStateSender,
    cancel: CancellationToken,
}

const USER_AGENT: &str = concat!("voxgate/", env!("CARGO_PKG_VERSION"));

impl SipAgent {
    /// Binds SIP on `config.bind` and starts the agent's tasks, which stop
    /// when `cancel` is cancelled. Inbound calls arrive on the receiver.
    pub async fn start(config: SipConfig, cancel: CancellationToken) -> Result<(SipAgent, mpsc::Receiver<InboundCall>), SipError> {
        let media = SessionConfig {
            media_timeout: Duration::from_secs(config.media_timeout_secs),
            opus_complexity: config.opus_complexity,
            ..SessionConfig::default()
        };
        let transport_layer = TransportLayer::new(cancel.child_token());
        let external = config.external_ip.map(|ip| SocketAddr::new(ip, config.bind.port()));
        let udp = UdpConnection::create_connection(config.bind, external, Some(cancel.child_token())).await?;
        let local: SocketAddr = udp.get_addr().addr.clone().try_into().map_err(|e: rsipstack::sip::Error| SipError::Stack(e.to_string()))?;
        transport_layer.add_transport(udp.into());
        let endpoint = EndpointBuilder::new()
            .with_cancel_token(cancel.child_token())
            .with_transport_layer(transport_layer)
            .with_user_agent(USER_AGENT)
            .with_inspector(Box::new(crate::digest::DigestAlgorithms))
            .build();
        let incoming = endpoint.incoming_transactions()?;
        let dialog_layer = Arc::new(DialogLayer::new(endpoint.inner.clone()));
        let (state_sender, mut state_receiver) = dialog_layer.new_dialog_state_channel();
        let media_ip = config.external_ip.unwrap_or(config.bind.ip());
        let inner = Arc::new(Inner {
            ports: PortRange::new(config.bind.ip(), config.rtp_port_min, config.rtp_port_max),
            media,
            config,
            dialog_layer,
            local,
            media_ip,
            routes: Mutex::new(HashMap::new()),
            state_sender,
            cancel: cancel.clone(),
        });
        let endpoint_inner = endpoint.inner.clone();
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = endpoint_inner.serve() => {}
                _ = stop.cancelled() => {}
            }
            drop(endpoint);
        });
        // Route dialog states to their call's task by Call-ID.
        let router = inner.clone();
        tokio::spawn(async move {
            while let Some(state) = state_receiver.recv().await {
                let call_id = state_call_id(&state);
                let sender = router.routes.lock().ok().and_then(|r| r.get(&call_id).cloned());
                if let Some(sender) = sender {
                    let _ = sender.send(state);
                }
            }
        });
        let (inbound_tx, inbound_rx) = mpsc::channel(64);
        tokio::spawn(serve_requests(inner.clone(), incoming, inbound_tx));
        Ok((SipAgent { inner }, inbound_rx))
    }

    /// The address SIP listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local
    }

    /// Places a call: sends the INVITE at once and returns; progress comes
    /// as [`CallEvent`]s.
    pub async fn dial(&self, dial: Dial) -> Result<Call, SipError> {
        let inner = &self.inner;
        let trunk = match &dial.trunk {
            Some(name) => inner.config.trunks.iter().find(|t| &t.name == name).ok_or_else(|| SipError::UnknownTrunk(name.clone()))?,
            None => inner.config.trunks.first().ok_or(SipError::NoTrunk)?,
        };
        let digits = dial.number.strip_prefix('+').unwrap_or_default();
        if !(7..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SipError::InvalidNumber(dial.number.clone()));
        }
        let (transport, uri_param) = match trunk.transport {
            Transport::Udp => (rsipstack::sip::Transport::Udp, ""),
            // rsipstack opens (and reuses) the TCP connection on demand.
            Transport::Tcp => (rsipstack::sip::Transport::Tcp, ";transport=tcp"),
        };
        let callee = uri(&format!("sip:{}@{}:{}{uri_param}", dial.number, trunk.host, trunk.port))?;
        let from_user = trunk.from_user.as_deref().unwrap_or("voxgate");
        let caller = uri(&format!("sip:{from_user}@{}", host_port(inner.media_ip, inner.local.port())))?;
        let contact = uri(&format!("sip:voxgate@{}{uri_param}", host_port(inner.media_ip, inner.local.port())))?;
        let destination = match trunk.outbound_proxy {
            Some(proxy) => proxy.to_string(),
            None => format!("{}:{}", trunk.host, trunk.port),
        };
        let destination = SipAddr {
            r#type: Some(transport),
            addr: HostWithPort::try_from(destination.as_str()).map_err(|e| SipError::Stack(e.to_string()))?,
        };
        let credential = match (&trunk.username, &trunk.password) {
            (Some(u), Some(p)) => Some(Credential { username: u.clone(), password: p.clone(), realm: None, auth_username: None }),
            _ => None,
        };

        let (media, local_media) = inner.open_media(None).await?;
        let call_id = format!("{}@voxgate", random_token());
        let (states_tx, states_rx) = mpsc::unbounded_channel();
        inner.route(&call_id, states_tx);
        let option = InviteOption {
            caller,
            callee,
            contact,
            destination: Some(destination),
            content_type: Some("application/sdp".into()),
            offer: Some(sdp::offer(&local_media).into_bytes()),
            credential,
            call_id: Some(call_id.clone()),
            ..Default::default()
        };
        let (dialog, invite) = match inner.dialog_layer.do_invite_async(option, inner.state_sender.clone()) {
            Ok(started) => started,
            Err(e) => {
                inner.unroute(&call_id);
                return Err(e.into());
            }
        };
        let (task, events_rx, hangup_tx, hangup_rx) =
            CallTask::new(inner.clone(), call_id.clone(), dialog, CallDirection::Outbound, &media, local_media);
        tokio::spawn(task.run_outbound(states_rx, hangup_rx, invite));
        Ok(Call { call_id, events: events_rx, media, hangup: hangup_tx })
    }
}

impl Inner {
    fn route(&self, call_id: &str, sender: mpsc::UnboundedSender<DialogState>) {
        if let Ok(mut r) = self.routes.lock() {
            r.insert(call_id.to_owned(), sender);
        }
    }

    fn unroute(&self, call_id: &str) {
        if let Ok(mut r) = self.routes.lock() {
            r.remove(call_id);
        }
    }

    async fn open_media(&self, remote: Option<sdp::RemoteMedia>) -> Result<(MediaHandle, LocalMedia), SipError> {
        let sockets = self.ports.bind().await?;
        let rtp_port = sockets.0.local_addr().map_err(voxgate_media::MediaError::Io)?.port();
        let local_media = LocalMedia {
            ip: self.media_ip,
            rtp_port,
            codecs: vec![Codec::Pcmu, Codec::Pcma, Codec::Opus],
            session_id: u64::from(rand::random::<u32>()),
            session_version: 1,
            direction: Direction::SendRecv,
        };
        let media = session::start(sockets, remote, self.media.clone())?;
        Ok((media, local_media))
    }
}

fn uri(s: &str) -> Result<Uri, SipError> {
    Uri::try_from(s).map_err(|e| SipError::Stack(format!("invalid SIP URI {s}: {e}")))
}

fn host_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

fn random_token() -> String {
    format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>())
}

fn state_call_id(state: &DialogState) -> String {
    match state {
        DialogState::Calling(id)
        | DialogState::Trying(id)
        | DialogState::Early(id, _)
        | DialogState::WaitAck(id, _)
        | DialogState::Confirmed(id, _)
        | DialogState::Updated(id, _, _)
        | DialogState::Publish(id, _, _)
        | DialogState::Notify(id, _, _)
        | DialogState::Refer(id, _, _)
        | DialogState::Message(id, _, _)
        | DialogState::Info(id, _, _)
        | DialogState::Options(id, _, _)
        | DialogState::Terminated(id, _) => id.call_id.clone(),
    }
}

/// An RFC 4028 session timer negotiated in the 2xx.
struct SessionTimer {
    interval: Duration,
    /// True when we must refresh; otherwise the far end must, and silence ends the call.
    we_refresh: bool,
    deadline: tokio::time::Instant,
}

impl SessionTimer {
    /// From `Session-Expires: <secs>[;refresher=uac|uas]` in a 2xx to our INVITE.
    fn from_answer(resp: &Response) -> Option<SessionTimer> {
        use rsipstack::sip::HeadersExt;
        let value = resp.session_expires_header()?.value().to_owned();
        let mut parts = value.split(';');
        // A floor keeps a bogus tiny value from turning into a refresh storm.
        let secs: u64 = parts.next()?.trim().parse::<u64>().ok()?.max(2);
        // §9: a 2xx should name the refresher; if it does not, the UAC refreshes.
        let refresher_is_uas = parts.any(|p| p.trim().eq_ignore_ascii_case("refresher=uas"));
        let mut timer = SessionTimer { interval: Duration::from_secs(secs), we_refresh: !refresher_is_uas, deadline: tokio::time::Instant::now() };
        timer.restart();
        Some(timer)
    }

    /// For an inbound INVITE that asks for a session timer (§9): we answer
    /// with the same interval and make the caller the refresher, so we
    /// only watch for its refreshes.
    fn from_offer(req: &rsipstack::sip::Request) -> Option<SessionTimer> {
        use rsipstack::sip::HeadersExt;
        let value = req.session_expires_header()?.value().to_owned();
        let secs: u64 = value.split(';').next()?.trim().parse::<u64>().ok()?.max(2);
        let mut timer = SessionTimer { interval: Duration::from_secs(secs), we_refresh: false, deadline: tokio::time::Instant::now() };
        timer.restart();
        Some(timer)
    }

    /// When the timer next fires. Without a timer the select branch is
    /// disabled by its guard, so any instant serves.
    fn deadline(timer: &Option<SessionTimer>) -> tokio::time::Instant {
        timer.as_ref().map_or_else(tokio::time::Instant::now, |t| t.deadline)
    }

    /// The headers of our 2xx that grant the caller's timer.
    fn answer_headers(&self) -> Vec<Header> {
        vec![
            Header::SessionExpires(format!("{};refresher=uac", self.interval.as_secs()).as_str().into()),
            Header::Require("timer".into()),
        ]
    }

    /// §10: the refresher refreshes at half the interval; the other side
    /// gives up at the interval less min(32 s, interval / 3).
    fn restart(&mut self) {
        let wait = if self.we_refresh { self.interval / 2 } else { self.interval - (self.interval / 3).min(Duration::from_secs(32)) };
        self.deadline = tokio::time::Instant::now() + wait;
    }

    fn header(&self) -> Header {
        Header::SessionExpires(format!("{};refresher=uac", self.interval.as_secs()).as_str().into())
    }
}

fn sdp_header() -> Vec<Header> {
    vec![Header::ContentType("application/sdp".into())]
}

fn reason_phrase(resp: &Response) -> String {
    resp.wire_reason.clone().unwrap_or_else(|| resp.status_code.text().to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallDirection {
    Outbound,
    Inbound,
}

struct CallTask {
    inner: Arc<Inner>,
    call_id: String,
    dialog: InviteDialog,
    direction: CallDirection,
    media: MediaControl,
    local_media: LocalMedia,
    events: mpsc::Sender<CallEvent>,
    answered_at: Option<Instant>,
    /// Why we sent CANCEL, if we did.
    cancel_reason: Option<EndReason>,
    /// Why we sent BYE, if we did.
    bye_reason: Option<EndReason>,
}

impl CallTask {
    /// A call's task, with the receiving end of its events and both ends of
    /// its hang-up channel.
    fn new(
        inner: Arc<Inner>,
        call_id: String,
        dialog: InviteDialog,
        direction: CallDirection,
        media: &MediaHandle,
        local_media: LocalMedia,
    ) -> (CallTask, mpsc::Receiver<CallEvent>, mpsc::Sender<()>, mpsc::Receiver<()>) {
        let (events, events_rx) = mpsc::channel(32);
        let (hangup_tx, hangup_rx) = mpsc::channel(4);
        let task = CallTask {
            inner,
            call_id,
            dialog,
            direction,
            media: media.control.clone(),
            local_media,
            events,
            answered_at: None,
            cancel_reason: None,
            bye_reason: None,
        };
        (task, events_rx, hangup_tx, hangup_rx)
    }

    async fn emit(&self, ev: CallEvent) {
        let _ = self.events.send(ev).await;
    }

    async fn run_outbound(
        mut self,
        mut states: mpsc::UnboundedReceiver<DialogState>,
        mut hangup: mpsc::Receiver<()>,
        invite: rsipstack::platform::JoinHandle<rsipstack::dialog::invitation::InviteAsyncResult>,
    ) {
        let ring_timeout = tokio::time::sleep(Duration::from_secs(self.inner.config.ring_timeout_secs));
        tokio::pin!(ring_timeout);
        tokio::pin!(invite);
        let mut invite_done = false;
        let mut final_response: Option<Response> = None;
        let mut ringing = false;
        let mut media_check = tokio::time::interval(Duration::from_millis(500));
        let mut session_timer: Option<SessionTimer> = None;
        let outcome = loop {
            let timer_deadline = SessionTimer::deadline(&session_timer);
            tokio::select! {
                state = states.recv() => {
                    let Some(state) = state else { break self.outcome(CallStatus::Failed, EndReason::TransportError, None) };
                    match state {
                        DialogState::Early(_, resp) => {
                            if !ringing {
                                ringing = true;
                                self.emit(CallEvent::Ringing { code: resp.status_code.code(), at: Instant::now() }).await;
                            }
                            if !resp.body.is_empty() {
                                if let Ok(remote) = sdp::parse_answer(&String::from_utf8_lossy(&resp.body), &self.local_media) {
                                    self.media.set_remote(remote).await;
                                    self.emit(CallEvent::EarlyMedia).await;
                                }
                            }
                        }
                        DialogState::Confirmed(_, resp) if self.answered_at.is_none() => {
                            match sdp::parse_answer(&String::from_utf8_lossy(&resp.body), &self.local_media) {
                                Ok(remote) => {
                                    self.media.set_remote(remote).await;
                                    let at = Instant::now();
                                    self.answered_at = Some(at);
                                    if self.cancel_reason.is_some() {
                                        // Answered as we cancelled: rsipstack BYEs it.
                                        continue;
                                    }
                                    session_timer = SessionTimer::from_answer(&resp);
                                    self.emit(CallEvent::Answered { at }).await;
                                }
                                Err(e) => {
                                    tracing::warn!(call_id = %self.call_id, error = %e, "unusable SDP answer, hanging up");
                                    self.bye_reason = Some(EndReason::Rejected);
                                    let _ = self.dialog.bye().await;
                                    break Outcome { status: CallStatus::Failed, reason: EndReason::Rejected, sip_code: Some(488), sip_reason: Some(e.to_string()) };
                                }
                            }
                        }
                        DialogState::Updated(_, req, handle) => {
                            self.answer_in_dialog(&req, handle).await;
                            // A re-INVITE or UPDATE from the far end refreshes the session.
                            if let Some(t) = session_timer.as_mut() {
                                t.restart();
                            }
                        }
                        DialogState::Terminated(_, reason) => {
                            if !invite_done {
                                // The final response arrives with the INVITE's end.
                                if let Ok(Ok(result)) = tokio::time::timeout(Duration::from_secs(2), &mut invite).await {
                                    final_response = result.ok().and_then(|(_, r)| r);
                                }
                            }
                            break self.terminated(reason, final_response.as_ref());
                        }
                        _ => {}
                    }
                }
                result = &mut invite, if !invite_done => {
                    invite_done = true;
                    match result {
                        Ok(Ok((_, resp))) => final_response = resp,
                        Ok(Err(e)) => {
                            tracing::info!(call_id = %self.call_id, error = %e, "INVITE failed");
                            if self.answered_at.is_none() {
                                break self.outcome(CallStatus::Failed, EndReason::TransportError, None);
                            }
                        }
                        Err(_) => break self.outcome(CallStatus::Failed, EndReason::TransportError, None),
                    }
                    if let Some(resp) = &final_response {
                        if resp.status_code.kind() != StatusCodeKind::Successful && self.answered_at.is_none() {
                            // Some failures end without a Terminated state.
                            let reason = self.cancel_reason.unwrap_or(EndReason::Rejected);
                            break self.final_failure(resp, reason);
                        }
                    }
                }
                _ = tokio::time::sleep_until(timer_deadline), if session_timer.is_some() && self.bye_reason.is_none() => {
                    let Some(timer) = session_timer.as_mut() else { continue };
                    if timer.we_refresh {
                        self.refresh_session(timer).await;
                        timer.restart();
                    } else {
                        tracing::info!(call_id = %self.call_id, "session not refreshed in time (RFC 4028), hanging up");
                        self.bye_reason = Some(EndReason::SessionExpired);
                        session_timer = None;
                        let _ = self.dialog.bye().await;
                    }
                }
                _ = &mut ring_timeout, if self.answered_at.is_none() && self.cancel_reason.is_none() => {
                    self.cancel_reason = Some(EndReason::RingTimeout);
                    let _ = self.dialog.cancel().await;
                }
                Some(()) = hangup.recv() => {
                    if self.answered_at.is_some() {
                        self.bye_reason = Some(EndReason::LocalHangup);
                        let _ = self.dialog.bye().await;
                    } else if self.cancel_reason.is_none() {
                        self.cancel_reason = Some(EndReason::Canceled);
                        let _ = self.dialog.cancel().await;
                    }
                }
                _ = media_check.tick(), if self.answered_at.is_some() && self.bye_reason.is_none() => {
                    self.hang_up_if_media_died().await;
                }
                _ = self.inner.cancel.cancelled() => {
                    if self.answered_at.is_some() { let _ = self.dialog.bye().await; } else { let _ = self.dialog.cancel().await; }
                    break self.outcome(CallStatus::Failed, EndReason::LocalHangup, None);
                }
            }
        };
        self.finish(outcome).await;
    }

    /// BYE when no RTP has arrived for the media timeout (a dead far end).
    async fn hang_up_if_media_died(&mut self) {
        if self.media.stats().timed_out {
            self.bye_reason = Some(EndReason::MediaTimeout);
            let _ = self.dialog.bye().await;
        }
    }

    /// Refreshes the session: UPDATE without a body (RFC 4028 §9); if the
    /// far end does not take UPDATE, a re-INVITE with our current SDP
    /// (retried on 491 glare).
    async fn refresh_session(&mut self, timer: &SessionTimer) {
        let headers = vec![timer.header(), Header::Supported("timer".into())];
        match self.dialog.update(Some(headers.clone()), None).await {
            Ok(Some(resp)) if resp.status_code.kind() == StatusCodeKind::Successful => return,
            Ok(resp) => tracing::debug!(call_id = %self.call_id, status = ?resp.map(|r| r.status_code.code()), "UPDATE refused, refreshing with re-INVITE"),
            Err(e) => tracing::debug!(call_id = %self.call_id, error = %e, "UPDATE failed, refreshing with re-INVITE"),
        }
        self.local_media.session_version += 1;
        let mut headers = headers;
        headers.extend(sdp_header());
        let offer = sdp::offer(&self.local_media).into_bytes();
        if let Err(e) = self.dialog.reinvite_with_glare_retry(Some(headers), Some(offer), 3).await {
            tracing::warn!(call_id = %self.call_id, error = %e, "session refresh failed");
        }
    }

    /// Answers a re-INVITE or UPDATE with our SDP (RFC 3264 §8).
    async fn answer_in_dialog(&mut self, req: &rsipstack::sip::Request, handle: rsipstack::dialog::dialog::TransactionHandle) {
        if !matches!(req.method, Method::Invite | Method::Update) {
            let _ = handle.reply(StatusCode::OK).await;
            return;
        }
        if req.body.is_empty() {
            // An offerless re-INVITE: offer what we have now.
            self.local_media.session_version += 1;
            let _ = handle.respond(StatusCode::OK, Some(sdp_header()), Some(sdp::offer(&self.local_media).into_bytes())).await;
            return;
        }
        self.local_media.session_version += 1;
        match sdp::answer(&String::from_utf8_lossy(&req.body), &self.local_media) {
            Ok((answer, remote)) => {
                let remote_direction = remote.direction;
                self.media.set_remote(remote).await;
                let _ = handle.respond(StatusCode::OK, Some(sdp_header()), Some(answer.into_bytes())).await;
                self.emit(CallEvent::Modified { remote_direction }).await;
            }
            Err(e) => {
                tracing::info!(call_id = %self.call_id, error = %e, "refusing re-INVITE offer");
                let _ = handle.reply(StatusCode::NotAcceptableHere).await;
            }
        }
    }

    fn outcome(&self, status: CallStatus, reason: EndReason, code: Option<u16>) -> Outcome {
        Outcome { status, reason, sip_code: code, sip_reason: None }
    }

    fn final_failure(&self, resp: &Response, reason: EndReason) -> Outcome {
        let code = resp.status_code.code();
        let status = match reason {
            EndReason::RingTimeout => CallStatus::NoAnswer,
            EndReason::Canceled => CallStatus::Canceled,
            _ => CallStatus::from_final_response(code),
        };
        Outcome { status, reason, sip_code: Some(code), sip_reason: Some(reason_phrase(resp)) }
    }

    fn terminated(&self, reason: TerminatedReason, final_response: Option<&Response>) -> Outcome {
        if self.answered_at.is_some() && self.cancel_reason.is_none() {
            let remote_hung_up = matches!(
                (self.direction, &reason),
                (CallDirection::Outbound, TerminatedReason::UasBye) | (CallDirection::Inbound, TerminatedReason::UacBye)
            );
            let reason = if remote_hung_up { EndReason::RemoteHangup } else { self.bye_reason.unwrap_or(EndReason::LocalHangup) };
            return Outcome { status: CallStatus::Completed, reason, sip_code: Some(200), sip_reason: Some("OK".into()) };
        }
        if let Some(cancel) = self.cancel_reason {
            let status = if cancel == EndReason::RingTimeout { CallStatus::NoAnswer } else { CallStatus::Canceled };
            return Outcome { status, reason: cancel, sip_code: final_response.map(|r| r.status_code.code()), sip_reason: final_response.map(reason_phrase) };
        }
        match (reason, final_response) {
            (_, Some(resp)) if resp.status_code.kind() != StatusCodeKind::Successful => self.final_failure(resp, EndReason::Rejected),
            (TerminatedReason::UasBusy, _) => self.outcome(CallStatus::Busy, EndReason::Rejected, Some(486)),
            (TerminatedReason::UasDecline, _) => self.outcome(CallStatus::Busy, EndReason::Rejected, Some(603)),
            (TerminatedReason::UasOther(code) | TerminatedReason::UacOther(code) | TerminatedReason::ProxyError(code), _) => {
                Outcome { status: CallStatus::from_final_response(code.code()), reason: EndReason::Rejected, sip_code: Some(code.code()), sip_reason: Some(code.text().to_owned()) }
            }
            (TerminatedReason::ProxyAuthRequired, _) => self.outcome(CallStatus::Failed, EndReason::Rejected, Some(407)),
            _ => self.outcome(CallStatus::Failed, EndReason::TransportError, None),
        }
    }

    async fn finish(self, outcome: Outcome) {
        tracing::info!(call_id = %self.call_id, status = %outcome.status, reason = outcome.reason.as_str(), sip_code = ?outcome.sip_code, "call ended");
        self.inner.dialog_layer.remove_dialog(&self.dialog.id());
        self.inner.unroute(&self.call_id);
        self.emit(CallEvent::Ended(outcome)).await;
    }

    /// 200 OK with our SDP answer (and session timer) to an inbound INVITE.
    async fn answer(&mut self, answer: &str, session_timer: &mut Option<SessionTimer>) -> Result<(), Outcome> {
        let mut headers = sdp_header();
        if let Some(t) = session_timer.as_mut() {
            headers.extend(t.answer_headers());
            t.restart();
        }
        if let Err(e) = self.dialog.accept(Some(headers), Some(answer.as_bytes().to_vec())) {
            tracing::warn!(call_id = %self.call_id, error = %e, "could not answer");
            return Err(self.outcome(CallStatus::Failed, EndReason::TransportError, None));
        }
        let at = Instant::now();
        self.answered_at = Some(at);
        self.emit(CallEvent::Answered { at }).await;
        Ok(())
    }

    async fn run_inbound(
        mut self,
        mut states: mpsc::UnboundedReceiver<DialogState>,
        mut hangup: mpsc::Receiver<()>,
        answer: String,
        mut session_timer: Option<SessionTimer>,
    ) {
        let mut media_check = tokio::time::interval(Duration::from_millis(500));
        let ring = Duration::from_millis(self.inner.config.inbound_ring_ms);
        let mut answer_at: Option<tokio::time::Instant> = None;
        let outcome = loop {
            let timer_deadline = SessionTimer::deadline(&session_timer);
            tokio::select! {
                _ = tokio::time::sleep_until(answer_at.unwrap_or_else(tokio::time::Instant::now)), if answer_at.is_some() && self.answered_at.is_none() => {
                    answer_at = None;
                    if let Err(outcome) = self.answer(&answer, &mut session_timer).await {
                        break outcome;
                    }
                }
                state = states.recv() => {
                    let Some(state) = state else { break self.outcome(CallStatus::Failed, EndReason::TransportError, None) };
                    match state {
                        DialogState::Calling(_) if self.answered_at.is_none() && answer_at.is_none() => {
                            if ring.is_zero() {
                                if let Err(outcome) = self.answer(&answer, &mut session_timer).await {
                                    break outcome;
                                }
                            } else {
                                if let Err(e) = self.dialog.ringing(None, None) {
                                    tracing::warn!(call_id = %self.call_id, error = %e, "could not send 180");
                                }
                                self.emit(CallEvent::Ringing { code: 180, at: Instant::now() }).await;
                                answer_at = Some(tokio::time::Instant::now() + ring);
                            }
                        }
                        DialogState::Updated(_, req, handle) => {
                            self.answer_in_dialog(&req, handle).await;
                            if let Some(t) = session_timer.as_mut() {
                                t.restart();
                            }
                        }
                        DialogState::Terminated(_, reason) => break self.terminated(reason, None),
                        _ => {}
                    }
                }
                Some(()) = hangup.recv() => {
                    self.bye_reason = Some(EndReason::LocalHangup);
                    let _ = self.dialog.bye().await;
                }
                _ = tokio::time::sleep_until(timer_deadline), if session_timer.is_some() && self.answered_at.is_some() && self.bye_reason.is_none() => {
                    tracing::info!(call_id = %self.call_id, "caller did not refresh the session (RFC 4028), hanging up");
                    self.bye_reason = Some(EndReason::SessionExpired);
                    session_timer = None;
                    let _ = self.dialog.bye().await;
                }
                _ = media_check.tick(), if self.answered_at.is_some() && self.bye_reason.is_none() => {
                    self.hang_up_if_media_died().await;
                }
                _ = self.inner.cancel.cancelled() => {
                    let _ = self.dialog.bye().await;
                    break self.outcome(CallStatus::Failed, EndReason::LocalHangup, None);
                }
            }
        };
        self.finish(outcome).await;
    }
}

/// Serves requests that arrive outside a client transaction: in-dialog
/// requests go to their dialog, new INVITEs are inbound calls.
async fn serve_requests(inner: Arc<Inner>, mut incoming: rsipstack::transaction::TransactionReceiver, inbound: mpsc::Sender<InboundCall>) {
    while let Some(mut tx) = incoming.recv().await {
        if let Some(dialog) = inner.dialog_layer.match_dialog(&tx) {
            tokio::spawn(async move {
                if let Dialog::Invite(mut d) = dialog {
                    let _ = d.handle(&mut tx).await;
                } else {
                    let _ = tx.reply(StatusCode::NotImplemented).await;
                }
            });
            continue;
        }
        match tx.original.method {
            Method::Invite => {
                let inner = inner.clone();
                let inbound = inbound.clone();
                tokio::spawn(async move {
                    if let Err(e) = accept_inbound(inner, tx, inbound).await {
                        tracing::info!(error = %e, "inbound INVITE not accepted");
                    }
                });
            }
            Method::Options => {
                let _ = tx.reply(StatusCode::OK).await;
            }
            Method::Ack => {}
            // BYE, CANCEL or others for a dialog we do not know (RFC 3261 §12.2.2).
            _ => {
                let _ = tx.reply(StatusCode::CallTransactionDoesNotExist).await;
            }
        }
    }
}

async fn accept_inbound(inner: Arc<Inner>, mut tx: Transaction, inbound: mpsc::Sender<InboundCall>) -> Result<(), SipError> {
    use rsipstack::sip::HeadersExt;
    let to_user = tx.original.uri.auth.as_ref().map(|a| a.user.clone()).unwrap_or_default();
    let from = tx.original.from_header().map(|h| h.value().to_owned()).unwrap_or_default();
    if !inner.config.inbound_numbers.iter().any(|n| n == &to_user || n == "*") {
        tx.reply(StatusCode::NotFound).await?;
        return Err(SipError::Stack(format!("no inbound route for '{to_user}'")));
    }
    let offer = String::from_utf8_lossy(&tx.original.body).into_owned();
    if offer.trim().is_empty() {
        tx.reply(StatusCode::NotAcceptableHere).await?;
        return Err(SipError::Stack("INVITE without SDP offer".into()));
    }
    let (media, mut local_media) = inner.open_media(None).await?;
    let (answer, remote) = match sdp::answer(&offer, &local_media) {
        Ok(a) => a,
        Err(e) => {
            tx.reply(StatusCode::NotAcceptableHere).await?;
            return Err(e.into());
        }
    };
    local_media.session_version += 1;
    media.control.set_remote(remote).await;
    let contact = uri(&format!("sip:{to_user}@{}", host_port(inner.media_ip, inner.local.port())))?;
    let (states_tx, states_rx) = mpsc::unbounded_channel();
    let call_id = {
        use rsipstack::sip::HeadersExt as _;
        tx.original.call_id_header().map(|h| h.value().to_owned()).unwrap_or_default()
    };
    inner.route(&call_id, states_tx);
    let mut dialog = inner.dialog_layer.get_or_create_server_invite(&tx, inner.state_sender.clone(), None, Some(contact))?;
    let timer = SessionTimer::from_offer(&tx.original);
    let (task, events_rx, hangup_tx, hangup_rx) =
        CallTask::new(inner.clone(), call_id.clone(), dialog.clone(), CallDirection::Inbound, &media, local_media);
    tokio::spawn(task.run_inbound(states_rx, hangup_rx, answer, timer));
    tokio::spawn(async move {
        let _ = dialog.handle(&mut tx).await;
    });
    let call = Call { call_id, events: events_rx, media, hangup: hangup_tx };
    let _ = inbound.send(InboundCall { to: to_user, from, call }).await;
    Ok(())
}
