//! WebRTC legs: a person talks to an agent from a browser. Opus both ways
//! over DTLS-SRTP, ICE with host candidates (loopback and LAN; no STUN or
//! TURN), one SDP offer and answer over HTTP (WHIP-style: the browser
//! gathers its candidates first, so does the answer).
//!
//! Like a WebSocket stream, the leg exists before the browser connects: its
//! [`MediaHandle`] is the call's from the start, the offer arrives later
//! through [`Offer`], and the leg reports its life as [`StreamEvent`]s
//! (started when ICE and DTLS are up). Caller audio goes through the same
//! jitter buffer and Opus decoder as RTP; agent audio is paced every 20 ms
//! (silence in between, as browsers expect a continuous stream).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::{MediaEngine, MIME_TYPE_OPUS};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::APIBuilder;
use webrtc::ice::network_type::NetworkType;
use webrtc::interceptor::registry::Registry;
use webrtc::media::Sample;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::rtp_transceiver::rtp_codec::{RTCRtpCodecCapability, RTCRtpCodecParameters, RTPCodecType};
use webrtc::track::track_local::track_local_static_sample::TrackLocalStaticSample;
use webrtc::track::track_local::TrackLocal;

use crate::dtmf;
use crate::error::MediaError;
use crate::jitter::{JitterBuffer, JitterConfig};
use crate::resample::frame_len;
use crate::sdp::Codec;
use crate::session::{jitter_for, reported_loss, AudioFrame, Codecs, Control, MediaControl, MediaEvent, MediaHandle, OpusComplexity, Pulled, SessionStats, PIPELINE_RATE};
use crate::streams::{StreamEnd, StreamEvent};

const TICK: Duration = Duration::from_millis(20);
/// Largest SDP offer taken.
pub const MAX_OFFER_BYTES: usize = 32 * 1024;

#[derive(Debug, Clone)]
pub struct WebRtcConfig {
    /// The browser must send its offer within this long.
    pub connect_timeout: Duration,
    /// No audio for this long after the start ends the call.
    pub media_timeout: Duration,
    /// Offer loopback candidates only (tests, and a browser on this host).
    pub loopback_only: bool,
    pub opus_complexity: OpusComplexity,
}

impl Default for WebRtcConfig {
    fn default() -> Self {
        WebRtcConfig {
            connect_timeout: Duration::from_secs(60),
            media_timeout: Duration::from_secs(30),
            loopback_only: false,
            opus_complexity: OpusComplexity::default(),
        }
    }
}

type Reply = oneshot::Sender<Result<String, MediaError>>;

/// Hands the browser's SDP offer to its leg and returns the answer.
pub struct Offer(oneshot::Sender<(String, Reply)>);

impl Offer {
    pub async fn answer(self, sdp: String) -> Result<String, MediaError> {
        let (tx, rx) = oneshot::channel();
        self.0.send((sdp, tx)).map_err(|_| MediaError::Sdp("the call is over".into()))?;
        rx.await.map_err(|_| MediaError::Sdp("the call ended before its answer".into()))?
    }

    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// DTLS asks rustls for the process's crypto provider; with more than one
/// compiled in (ring here, aws-lc-rs for HTTPS clients) rustls will not
/// pick, so WebRTC installs ring unless a provider is already chosen.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Starts a WebRTC leg that waits for the browser's offer.
pub fn start(config: WebRtcConfig) -> (MediaHandle, Offer, mpsc::Receiver<StreamEvent>) {
    install_crypto();
    let (control_tx, control_rx) = mpsc::channel(256);
    let (incoming_tx, incoming_rx) = mpsc::channel(50);
    let (events_tx, events_rx) = mpsc::channel(64);
    let (stats_tx, stats_rx) = watch::channel(SessionStats::default());
    let (offer_tx, offer_rx) = oneshot::channel();
    let (life_tx, life_rx) = mpsc::channel(4);
    let leg = Leg { config, incoming: incoming_tx, events: events_tx, life: life_tx, stats_tx, stats: SessionStats::default() };
    let task = tokio::spawn(leg.run(control_rx, offer_rx));
    let handle = MediaHandle::new(MediaControl::new(control_tx, stats_rx, None), incoming_rx, events_rx, task);
    (handle, Offer(offer_tx), life_rx)
}

struct Leg {
    config: WebRtcConfig,
    incoming: mpsc::Sender<AudioFrame>,
    events: mpsc::Sender<MediaEvent>,
    life: mpsc::Sender<StreamEvent>,
    stats_tx: watch::Sender<SessionStats>,
    stats: SessionStats,
}

/// What the peer connection's callbacks report to the leg.
enum PeerEvent {
    State(RTCPeerConnectionState),
    Rtp { seq: u16, ts: u32, payload: Bytes },
    /// The share of our stream the browser reports lost (RTCP), in percent.
    Loss(f64),
}

/// A peer connection answering `offer`, with our Opus track on it.
struct Peer {
    pc: Arc<RTCPeerConnection>,
    track: Arc<TrackLocalStaticSample>,
    answer: String,
}

async fn connect(offer: String, config: &WebRtcConfig, events: mpsc::Sender<PeerEvent>) -> Result<Peer, webrtc::Error> {
    let mut media = MediaEngine::default();
    media.register_codec(
        RTCRtpCodecParameters {
            capability: opus_capability(),
            payload_type: 111,
            ..Default::default()
        },
        RTPCodecType::Audio,
    )?;
    let registry = register_default_interceptors(Registry::new(), &mut media)?;
    let mut settings = SettingEngine::default();
    settings.set_network_types(vec![NetworkType::Udp4]);
    if config.loopback_only {
        settings.set_include_loopback_candidate(true);
        settings.set_ip_filter(Box::new(|ip| ip.is_loopback()));
    }
    let api = APIBuilder::new().with_media_engine(media).with_interceptor_registry(registry).with_setting_engine(settings).build();
    let pc = Arc::new(api.new_peer_connection(RTCConfiguration::default()).await?);
    let track = Arc::new(TrackLocalStaticSample::new(opus_capability(), "agent".into(), "voxgate".into()));
    let sender = pc.add_track(Arc::clone(&track) as Arc<dyn TrackLocal + Send + Sync>).await?;
    // RTCP from the browser feeds the interceptors; it must be read. Its
    // reports of our stream set how much FEC we code.
    let on_rtcp = events.clone();
    tokio::spawn(async move {
        while let Ok((packets, _)) = sender.read_rtcp().await {
            if let Some(percent) = reported_loss(&packets, None) {
                let _ = on_rtcp.try_send(PeerEvent::Loss(percent));
            }
        }
    });
    let on_state = events.clone();
    pc.on_peer_connection_state_change(Box::new(move |s| {
        let _ = on_state.try_send(PeerEvent::State(s));
        Box::pin(async {})
    }));
    pc.on_track(Box::new(move |remote, _, _| {
        let events = events.clone();
        Box::pin(async move {
            if !remote.codec().capability.mime_type.eq_ignore_ascii_case(MIME_TYPE_OPUS) {
                return;
            }
            tokio::spawn(async move {
                while let Ok((packet, _)) = remote.read_rtp().await {
                    let ev = PeerEvent::Rtp { seq: packet.header.sequence_number, ts: packet.header.timestamp, payload: packet.payload };
                    if events.is_closed() {
                        break;
                    }
                    let _ = events.try_send(ev);
                }
            });
        })
    }));
    pc.set_remote_description(RTCSessionDescription::offer(offer)?).await?;
    let answer = pc.create_answer(None).await?;
    let mut gathered = pc.gathering_complete_promise().await;
    pc.set_local_description(answer).await?;
    let _ = gathered.recv().await;
    let answer = pc.local_description().await.map(|d| d.sdp).unwrap_or_default();
    Ok(Peer { pc, track, answer })
}

fn opus_capability() -> RTCRtpCodecCapability {
    RTCRtpCodecCapability {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

impl Leg {
    async fn run(mut self, mut control: mpsc::Receiver<Control>, offer: oneshot::Receiver<(String, Reply)>) {
        let end = self.serve(&mut control, offer).await;
        self.stats_tx.send_replace(self.stats.clone());
        let _ = self.life.send(StreamEvent::Ended(end)).await;
        // The leg lives as long as its handle (see `streams`).
        while control.recv().await.is_some() {}
    }

    async fn serve(&mut self, control: &mut mpsc::Receiver<Control>, offer: oneshot::Receiver<(String, Reply)>) -> StreamEnd {
        let mut outgoing: VecDeque<i16> = VecDeque::new();
        let wait = tokio::time::sleep(self.config.connect_timeout);
        tokio::pin!(wait);
        let mut offer = offer;
        let (sdp, reply) = loop {
            tokio::select! {
                o = &mut offer => match o {
                    Ok(o) => break o,
                    Err(_) => return StreamEnd::NotConnected,
                },
                msg = control.recv() => match msg {
                    Some(Control::Close) | None => return StreamEnd::Closed,
                    Some(Control::Play(pcm)) => outgoing.extend(pcm),
                    Some(_) => {}
                },
                _ = &mut wait => return StreamEnd::NotConnected,
            }
        };
        let (peer_tx, mut peer_rx) = mpsc::channel(256);
        let peer = match connect(sdp, &self.config, peer_tx).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "WebRTC offer refused");
                let _ = reply.send(Err(MediaError::Sdp(e.to_string())));
                return StreamEnd::Failed(format!("offer refused: {e}"));
            }
        };
        let _ = reply.send(Ok(peer.answer.clone()));
        let end = self.converse(control, &mut peer_rx, &peer, outgoing).await;
        let _ = peer.pc.close().await;
        end
    }

    async fn converse(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
        peer_rx: &mut mpsc::Receiver<PeerEvent>,
        peer: &Peer,
        mut outgoing: VecDeque<i16>,
    ) -> StreamEnd {
        let mut codecs = match Codecs::new(Codec::Opus, self.config.opus_complexity) {
            Ok(c) => c,
            Err(e) => return StreamEnd::Failed(e.to_string()),
        };
        let mut jitter: JitterBuffer<Bytes> = JitterBuffer::new(jitter_for(Codec::Opus, JitterConfig::default()));
        let frame = frame_len(PIPELINE_RATE);
        let mut started = false;
        let mut was_playing = false;
        let mut last_rx = Instant::now();
        // ICE and DTLS must come up in time too.
        let connect_by = Instant::now() + self.config.connect_timeout;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut pcm_in: Vec<i16> = Vec::with_capacity(frame * 6);
        loop {
            tokio::select! {
                biased;
                msg = control.recv() => match msg {
                    Some(Control::Play(pcm)) => outgoing.extend(pcm),
                    Some(Control::Flush) => {
                        outgoing.clear();
                        was_playing = false;
                    }
                    Some(Control::Dtmf(d)) => outgoing.extend(dtmf::key_tone(d, 100, PIPELINE_RATE).unwrap_or_default()),
                    Some(Control::Close) | None => return StreamEnd::Closed,
                    Some(Control::Remote(_) | Control::Direction(_)) => {}
                },
                ev = peer_rx.recv() => match ev {
                    Some(PeerEvent::State(RTCPeerConnectionState::Connected)) if !started => {
                        started = true;
                        last_rx = Instant::now();
                        tracing::info!("WebRTC call connected");
                        let _ = self.life.try_send(StreamEvent::Started);
                    }
                    Some(PeerEvent::State(s @ (RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed | RTCPeerConnectionState::Disconnected))) => {
                        tracing::info!(state = %s, "WebRTC connection over");
                        return if started { StreamEnd::Stopped } else { StreamEnd::NotConnected };
                    }
                    Some(PeerEvent::State(_)) => {}
                    Some(PeerEvent::Loss(percent)) => {
                        self.stats.remote_loss_percent = Some(percent);
                        codecs.set_expected_loss(percent);
                    }
                    Some(PeerEvent::Rtp { seq, ts, payload }) => {
                        last_rx = Instant::now();
                        self.stats.packets_received += 1;
                        jitter.push(seq, ts, last_rx, payload);
                    }
                    None => return StreamEnd::Stopped,
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    if !started {
                        if now >= connect_by {
                            return StreamEnd::NotConnected;
                        }
                        continue;
                    }
                    if now.duration_since(last_rx) >= self.config.media_timeout {
                        let _ = self.events.try_send(MediaEvent::Timeout);
                        return StreamEnd::Timeout;
                    }
                    // One frame of caller audio in.
                    let (mut received_at, mut arrived_at) = (None, None);
                    while pcm_in.len() < frame {
                        let mut out = Vec::with_capacity(frame * 6);
                        match codecs.pull(&mut jitter, frame, &mut out) {
                            Pulled::Packet => (received_at, arrived_at) = (Some(now), jitter.played_arrival()),
                            Pulled::Recovered => self.stats.fec_recovered += 1,
                            Pulled::Concealed => {}
                            Pulled::Buffering => out.resize(frame - pcm_in.len(), 0),
                        }
                        pcm_in.extend(out);
                    }
                    let pcm: Vec<i16> = pcm_in.drain(..frame).collect();
                    if self.incoming.try_send(AudioFrame { pcm, received_at, arrived_at }).is_err() {
                        self.stats.dropped_frames += 1;
                    }
                    // One frame of agent audio (or silence) out.
                    let have = outgoing.len().min(frame);
                    let speaking = have > 0;
                    let mut pcm: Vec<i16> = outgoing.drain(..have).collect();
                    pcm.resize(frame, 0);
                    let mut coded = Vec::with_capacity(200);
                    codecs.encode(&pcm, &mut coded);
                    if speaking && !was_playing {
                        let _ = self.events.try_send(MediaEvent::PlayoutStarted { at: now });
                    }
                    let sample = Sample { data: Bytes::from(coded), duration: TICK, ..Default::default() };
                    if peer.track.write_sample(&sample).await.is_ok() {
                        self.stats.packets_sent += 1;
                    }
                    if speaking && outgoing.is_empty() {
                        let _ = self.events.try_send(MediaEvent::PlayoutEnded { at: Instant::now() });
                    }
                    was_playing = speaking;
                    if self.stats.packets_sent.is_multiple_of(5) {
                        self.stats.jitter = jitter.stats();
                        self.stats_tx.send_replace(self.stats.clone());
                    }
                }
            }
        }
    }
}
